// qcowmap hash: whole-disk and per-block digests against the tools everyone trusts
// (sha256sum, openssl dgst, xxhsum) run over `qemu-img convert -O raw` output, for plain,
// compressed, subcluster, backing-chain and snapshot images; the library API; CLI formats
// and errors.
#include "support.hpp"

#include <qcowmap/hash.hpp>

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>

namespace qcowmap {
namespace {

using test::cli;

namespace fs = std::filesystem;
using test::CommandResult;
using test::run;
using test::run_ok;
using test::shell_quote;
using test::TempDir;

/// The first whitespace-separated word of `text` (the digest of a `*sum` line).
std::string first_word(const std::string& text) {
    std::istringstream in(text);
    std::string word;
    in >> word;
    return word;
}

/// The digest the reference tool prints for `file`.
std::string oracle_digest(const std::string& algo, const fs::path& file) {
    const std::string f = shell_quote(file.string());
    if (algo == "sha256")
        return first_word(run_ok("sha256sum " + f));
    if (algo == "sha512")
        return first_word(run_ok("openssl dgst -sha512 -r " + f));
    if (algo == "blake2b512")
        return first_word(run_ok("openssl dgst -blake2b512 -r " + f));
    if (algo == "xxh3-128")
        return first_word(run_ok("xxhsum -H2 " + f));
    ADD_FAILURE() << "no oracle for " << algo;
    return {};
}

const char* const kAlgorithms[] = {"sha256", "sha512", "blake2b512", "xxh3-128"};

/// One image under test: how to build it, and how qemu-img / qcowmap select what to read.
struct Case {
    std::string name;
    fs::path image;
    std::string convert_extra; // e.g. "-l snapshot.name=s1"
    std::string cli_extra;     // e.g. "--snapshot=s1"
    OpenOptions open;
};

class Hash : public ::testing::Test {
  protected:
    /// Raw bytes of the case as qemu-img sees them, written to a file.
    fs::path raw_of(const Case& c) {
        fs::path raw = dir_ / (c.name + ".raw");
        run_ok("qemu-img convert " + c.convert_extra + " -O raw " + shell_quote(c.image.string()) +
               " " + shell_quote(raw.string()));
        return raw;
    }

    std::vector<Case> cases() {
        std::vector<Case> out;
        // Plain: data, zero clusters, unallocated gaps, a partial last cluster of data.
        fs::path plain = dir_ / "plain.qcow2";
        test::make_image(plain, "cluster_size=64k", "5M",
                         {"write -P 0xab 0 100k", "write -P 0xcd 1M 640k", "write -z 3M 512k",
                          "write -P 0x11 4800k 20k"});
        out.push_back({"plain", plain, "", "", {}});
        // Compressed clusters (zlib and zstd) next to plain ones.
        for (std::string type : {"zlib", "zstd"}) {
            fs::path img = dir_ / ("compressed-" + type + ".qcow2");
            test::make_image(img, "cluster_size=64k,compression_type=" + type, "4M",
                             {"write -c -P 0x5a 0 64k", "write -c -P 0x7e 128k 64k",
                              "write -P 0x01 1M 64k", "write -c -P 0x33 2M 64k"});
            out.push_back({"compressed-" + type, img, "", "", {}});
        }
        // Subclusters: extended L2, 32 subclusters of 2 KiB each in 64 KiB clusters.
        fs::path sub = dir_ / "subcluster.qcow2";
        test::make_image(sub, "cluster_size=64k,extended_l2=on", "2M",
                         {"write -P 0x42 2k 2k", "write -P 0x43 10k 6k", "write -z 8k 2k",
                          "write -P 0x44 1M 3k"});
        out.push_back({"subcluster", sub, "", "", {}});
        // Backing chain: a base, an overlay that overwrites and zeroes parts of it.
        fs::path base = dir_ / "base.qcow2";
        test::make_image(base, "cluster_size=64k", "3M",
                         {"write -P 0x10 0 1M", "write -P 0x20 2M 512k"});
        fs::path overlay = dir_ / "overlay.qcow2";
        run_ok("qemu-img create -q -f qcow2 -b " + shell_quote(base.string()) + " -F qcow2 " +
               shell_quote(overlay.string()) + " 4M");
        run_ok("qemu-io -f qcow2 -c 'write -P 0x99 64k 64k' -c 'write -z 2M 64k' " +
               shell_quote(overlay.string()));
        out.push_back({"chain", overlay, "", "", {}});
        // Snapshot: the snapshot's contents differ from the active disk's.
        fs::path snap = dir_ / "snapshot.qcow2";
        test::make_image(snap, "cluster_size=64k", "2M", {"write -P 0x61 0 256k"});
        run_ok("qemu-img snapshot -c s1 " + shell_quote(snap.string()));
        run_ok("qemu-io -f qcow2 -c 'write -P 0x62 64k 64k' -c 'write -P 0x63 1M 64k' " +
               shell_quote(snap.string()));
        OpenOptions at_s1;
        at_s1.snapshot = "s1";
        out.push_back({"snapshot", snap, "-l snapshot.name=s1", "--snapshot=s1", at_s1});
        out.push_back({"snapshot-active", snap, "", "", {}});
        return out;
    }

    TempDir dir_;
};

TEST_F(Hash, WholeDiskEqualsReferenceToolsOnQemuRawOutput) {
    for (const Case& c : cases()) {
        fs::path raw = raw_of(c);
        for (std::string algo : kAlgorithms) {
            std::string expected = oracle_digest(algo, raw);
            ASSERT_FALSE(expected.empty());
            // CLI: coreutils format.
            std::string out = run_ok(cli() + " hash --algo=" + algo + " " + c.cli_extra + " " +
                                     shell_quote(c.image.string()));
            EXPECT_EQ(out, expected + "  " + c.image.string() + "\n") << c.name << " " << algo;
            std::string mapped = run_ok(cli() + " hash --io=mmap --algo=" + algo + " " +
                                        c.cli_extra + " " + shell_quote(c.image.string()));
            EXPECT_EQ(mapped, out) << c.name << " " << algo << " --io=mmap";
            // Library, single-threaded and with decompression workers.
            auto image = Image::open(c.image, c.open);
            ASSERT_TRUE(image) << image.error().message;
            for (unsigned threads : {1u, 2u}) {
                for (DataAccess access : {DataAccess::read, DataAccess::mapping}) {
                    HashOptions options;
                    options.algorithm = *parse_hash_algorithm(algo);
                    options.threads = threads;
                    options.data_access = access;
                    auto digest = hash_image(*image, options);
                    ASSERT_TRUE(digest) << digest.error().message;
                    EXPECT_EQ(digest->hex(), expected)
                        << c.name << " " << algo << " " << threads << " "
                        << (access == DataAccess::read ? "read" : "mapping");
                    EXPECT_EQ(digest->size, digest_size(options.algorithm));
                }
            }
        }
    }
}

/// Digests of each `block_size` piece of `raw`, computed by the reference tool over files
/// made by split(1).
std::vector<std::string> oracle_blocks(const TempDir& dir, const fs::path& raw,
                                       const std::string& algo, std::uint64_t block_size) {
    fs::path pieces = dir / ("pieces-" + raw.stem().string());
    fs::create_directories(pieces);
    run_ok("split -a 6 -d -b " + std::to_string(block_size) + " " + shell_quote(raw.string()) +
           " " + shell_quote((pieces / "b").string()));
    // One tool run over all pieces (split names them in order: b000000, b000001...).
    std::string tool = algo == "sha256"       ? "sha256sum"
                       : algo == "sha512"     ? "openssl dgst -sha512 -r"
                       : algo == "blake2b512" ? "openssl dgst -blake2b512 -r"
                                              : "xxhsum -H2";
    std::istringstream lines(
        run_ok("cd " + shell_quote(pieces.string()) + " && " + tool + " $(ls | sort)"));
    std::vector<std::string> digests;
    std::string line;
    while (std::getline(lines, line))
        digests.push_back(first_word(line));
    fs::remove_all(pieces);
    return digests;
}

TEST_F(Hash, BlockManifestEqualsReferenceToolsPerBlock) {
    for (const Case& c : cases()) {
        fs::path raw = raw_of(c);
        const std::uint64_t block_size = c.name == "subcluster" ? 4096 : 65536;
        for (std::string algo : {"sha256", "xxh3-128"}) {
            std::vector<std::string> expected = oracle_blocks(dir_, raw, algo, block_size);
            ASSERT_FALSE(expected.empty());
            auto image = Image::open(c.image, c.open);
            ASSERT_TRUE(image) << image.error().message;
            for (unsigned threads : {1u, 2u, 3u}) {
                BlockHashOptions options;
                options.algorithm = *parse_hash_algorithm(algo);
                options.block_size = block_size;
                options.threads = threads;
                // Odd thread counts take the data from the mapping, even ones read it.
                options.data_access = threads % 2 ? DataAccess::mapping : DataAccess::read;
                std::vector<BlockDigest> got;
                auto ok = hash_blocks(*image, options, [&](const BlockDigest& b) -> Result<void> {
                    got.push_back(b);
                    return {};
                });
                ASSERT_TRUE(ok) << ok.error().message;
                ASSERT_EQ(got.size(), expected.size()) << c.name;
                for (std::size_t i = 0; i < got.size(); ++i) {
                    EXPECT_EQ(got[i].index, i);
                    EXPECT_EQ(got[i].offset, i * block_size);
                    EXPECT_EQ(got[i].digest.hex(), expected[i])
                        << c.name << " " << algo << " block " << i << " threads " << threads;
                }
            }
            // The CLI's text manifest carries the same digests.
            std::string out = run_ok(cli() + " hash --algo=" + algo +
                                     " --block-size=" + std::to_string(block_size) + " " +
                                     c.cli_extra + " " + shell_quote(c.image.string()));
            std::istringstream lines(out);
            std::string line;
            std::getline(lines, line);
            EXPECT_TRUE(line.starts_with("# qcowmap block manifest: algorithm=" + algo)) << line;
            std::size_t i = 0;
            while (std::getline(lines, line)) {
                std::istringstream fields(line);
                std::uint64_t index = 0, offset = 0;
                std::string digest, kind;
                fields >> index >> offset >> digest >> kind;
                ASSERT_LT(i, expected.size());
                EXPECT_EQ(index, i);
                EXPECT_EQ(offset, i * block_size);
                EXPECT_EQ(digest, expected[i]) << c.name << " line " << i;
                EXPECT_TRUE(kind == "zero" || kind == "data") << line;
                ++i;
            }
            EXPECT_EQ(i, expected.size());
        }
    }
}

TEST_F(Hash, ZeroBlocksAreRecognisedFromTheMap) {
    fs::path img = dir_ / "z.qcow2";
    // Block 0: data; 1: zero cluster; 2: unallocated; 3: data that is all zeros (hashed).
    test::make_image(img, "cluster_size=64k", "256k",
                     {"write -P 0x7 0 64k", "write -z 64k 64k", "write -P 0 192k 64k"});
    auto image = Image::open(img);
    ASSERT_TRUE(image);
    BlockHashOptions options;
    options.block_size = 65536;
    std::vector<BlockDigest> got;
    ASSERT_TRUE(hash_blocks(*image, options, [&](const BlockDigest& b) -> Result<void> {
        got.push_back(b);
        return {};
    }));
    ASSERT_EQ(got.size(), 4u);
    EXPECT_FALSE(got[0].zero);
    EXPECT_TRUE(got[1].zero);
    EXPECT_TRUE(got[2].zero);
    EXPECT_FALSE(got[3].zero);
    auto zero = zero_digest(HashAlgorithm::sha256, 65536);
    ASSERT_TRUE(zero);
    EXPECT_EQ(got[1].digest, *zero);
    EXPECT_EQ(got[3].digest, *zero); // same digest, but the map said data
    // sha256 of 64 KiB of zeros, from sha256sum.
    EXPECT_EQ(zero->hex(), first_word(run_ok("head -c 65536 /dev/zero | sha256sum")));
    // JSON manifest: flags and digests.
    std::string json = run_ok(cli() + " hash --block-size=64k --json " + shell_quote(img.string()));
    EXPECT_NE(json.find("\"block-size\": 65536"), std::string::npos) << json;
    EXPECT_NE(json.find("{\"index\": 1, \"offset\": 65536, \"length\": 65536, \"digest\": \"" +
                        zero->hex() + "\", \"zero\": true}"),
              std::string::npos)
        << json;
    EXPECT_NE(json.find("{\"index\": 3, \"offset\": 196608, \"length\": 65536, \"digest\": \"" +
                        zero->hex() + "\", \"zero\": false}"),
              std::string::npos)
        << json;
}

TEST_F(Hash, ShortLastBlock) {
    fs::path img = dir_ / "odd.qcow2";
    // 100 KiB + 512: the last 64 KiB block is short (36 KiB + 512).
    test::make_image(img, "cluster_size=4k", "102912", {"write -P 0x9 98k 2560"});
    fs::path raw = dir_ / "odd.raw";
    run_ok("qemu-img convert -O raw " + shell_quote(img.string()) + " " +
           shell_quote(raw.string()));
    auto expected = oracle_blocks(dir_, raw, "sha256", 65536);
    ASSERT_EQ(expected.size(), 2u);
    auto image = Image::open(img);
    ASSERT_TRUE(image);
    std::vector<BlockDigest> got;
    BlockHashOptions options;
    ASSERT_TRUE(hash_blocks(*image, options, [&](const BlockDigest& b) -> Result<void> {
        got.push_back(b);
        return {};
    }));
    ASSERT_EQ(got.size(), 2u);
    EXPECT_EQ(got[1].length, 102912u - 65536u);
    EXPECT_EQ(got[0].digest.hex(), expected[0]);
    EXPECT_EQ(got[1].digest.hex(), expected[1]);
    EXPECT_TRUE(got[0].zero);
    EXPECT_FALSE(got[1].zero);
}

TEST_F(Hash, SinkErrorStopsTheWalk) {
    fs::path img = dir_ / "s.qcow2";
    test::make_image(img, "cluster_size=64k", "64M", {"write -P 1 0 1M"});
    auto image = Image::open(img);
    ASSERT_TRUE(image);
    for (unsigned threads : {1u, 2u}) {
        BlockHashOptions options;
        options.block_size = 4096;
        options.threads = threads;
        int seen = 0;
        auto ok = hash_blocks(*image, options, [&](const BlockDigest&) -> Result<void> {
            if (++seen == 10)
                return Error{ErrorCode::io_error, "enough"};
            return {};
        });
        ASSERT_FALSE(ok);
        EXPECT_EQ(ok.error().message, "enough");
        EXPECT_EQ(seen, 10);
    }
}

TEST_F(Hash, AlgorithmNamesAndSizes) {
    EXPECT_EQ(parse_hash_algorithm("sha256"), HashAlgorithm::sha256);
    EXPECT_EQ(parse_hash_algorithm("xxh3-128"), HashAlgorithm::xxh3_128);
    EXPECT_FALSE(parse_hash_algorithm("md5"));
    EXPECT_EQ(digest_size(HashAlgorithm::sha512), 64u);
    EXPECT_EQ(digest_size(HashAlgorithm::xxh3_128), 16u);
    // The incremental hasher over pieces equals one update.
    auto h = Hasher::create(HashAlgorithm::sha256);
    ASSERT_TRUE(h);
    std::string text = "abc";
    h->update(std::as_bytes(std::span(text)));
    auto d = h->finish();
    ASSERT_TRUE(d);
    EXPECT_EQ(d->hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    // finish() starts afresh.
    auto empty = h->finish();
    ASSERT_TRUE(empty);
    EXPECT_EQ(empty->hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST_F(Hash, BadBlockSizes) {
    fs::path img = dir_ / "b.qcow2";
    test::make_image(img, "", "1M");
    auto image = Image::open(img);
    ASSERT_TRUE(image);
    for (std::uint64_t bs : {0ull, 2048ull, 6144ull, 65537ull}) {
        BlockHashOptions options;
        options.block_size = bs;
        auto ok =
            hash_blocks(*image, options, [](const BlockDigest&) -> Result<void> { return {}; });
        ASSERT_FALSE(ok) << bs;
        EXPECT_EQ(ok.error().code, ErrorCode::invalid_argument);
        EXPECT_EQ(ok.error().message,
                  "block size " + std::to_string(bs) + " is not a power of two of at least 4096");
    }
    for (std::string bad : {"2k", "6k", "abc", "0"}) {
        CommandResult r =
            run(cli() + " hash --block-size=" + bad + " " + shell_quote(img.string()));
        EXPECT_EQ(r.exit_code, 1) << bad;
        EXPECT_EQ(r.err, "qcowmap: usage: invalid --block-size '" + bad +
                             "': not a power of two of at least 4k (see qcowmap hash --help)\n");
        EXPECT_EQ(r.out, "");
    }
    CommandResult r = run(cli() + " hash --algo=md5 " + shell_quote(img.string()));
    EXPECT_EQ(r.exit_code, 1);
}

TEST_F(Hash, SeveralImagesAndErrorsLikeSha256sum) {
    fs::path a = dir_ / "a.qcow2";
    fs::path b = dir_ / "b.qcow2";
    test::make_image(a, "", "1M", {"write -P 1 0 4k"});
    test::make_image(b, "", "2M", {"write -P 2 1M 4k"});
    fs::path missing = dir_ / "missing.qcow2";
    CommandResult r = run(cli() + " hash " + shell_quote(a.string()) + " " +
                          shell_quote(missing.string()) + " " + shell_quote(b.string()));
    EXPECT_EQ(r.exit_code, 1);
    fs::path ra = dir_ / "a.raw", rb = dir_ / "b.raw";
    run_ok("qemu-img convert -O raw " + shell_quote(a.string()) + " " + shell_quote(ra.string()));
    run_ok("qemu-img convert -O raw " + shell_quote(b.string()) + " " + shell_quote(rb.string()));
    EXPECT_EQ(r.out, oracle_digest("sha256", ra) + "  " + a.string() + "\n" +
                         oracle_digest("sha256", rb) + "  " + b.string() + "\n");
    EXPECT_EQ(r.err, "qcowmap: " + missing.string() + ": No such file or directory\n");
    // JSON: one object per image.
    std::string json = run_ok(cli() + " hash --json --algo=xxh3-128 " + shell_quote(a.string()));
    EXPECT_EQ(json, "[\n{\"image\": " + std::string("\"") + a.string() +
                        "\", \"algorithm\": \"xxh3-128\", \"size\": 1048576, \"digest\": \"" +
                        oracle_digest("xxh3-128", ra) + "\"}\n]\n");
}

TEST_F(Hash, CorruptImageIsOneLineExitOne) {
    fs::path img = dir_ / "c.qcow2";
    test::make_image(img, "cluster_size=64k", "1M", {"write -P 1 0 64k"});
    // Point the first L1 entry far beyond the end of the file.
    auto bytes = test::read_file(img);
    // L1 table offset: header bytes 40-47.
    std::uint64_t l1 = 0;
    for (int i = 40; i < 48; ++i)
        l1 = (l1 << 8) | static_cast<std::uint8_t>(bytes[i]);
    const std::uint8_t entry[8] = {0x80, 0, 0, 0x7f, 0, 0, 0, 0};
    for (int i = 0; i < 8; ++i)
        bytes[l1 + i] = std::byte{entry[i]};
    test::write_file(img, bytes);
    for (std::string extra : {"", "--block-size=64k"}) {
        CommandResult r = run(cli() + " hash " + extra + " " + shell_quote(img.string()));
        EXPECT_EQ(r.exit_code, 1) << extra;
        EXPECT_TRUE(r.err.starts_with("qcowmap: " + img.string() + ": L2 table at 0x7f00000000"))
            << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1);
    }
}

// Several images are hashed at once (one per core) and printed in argument order, whatever
// order they finish in: a large image first, a missing one and a corrupt one (which fails
// while being hashed) in the middle.
TEST_F(Hash, ManyImagesAtOnceComeOutInArgumentOrder) {
    std::vector<fs::path> images;
    fs::path big = dir_ / "big.qcow2";
    test::make_image(big, "cluster_size=64k", "64M", {"write -P 0x11 0 48M"});
    images.push_back(big);
    for (int i = 0; i < 3; ++i) {
        fs::path small = dir_ / ("small" + std::to_string(i) + ".qcow2");
        test::make_image(small, "cluster_size=64k,compression_type=zstd", "2M",
                         {"write -P 0x2" + std::to_string(i) + " 0 64k",
                          "write -c -P 0x3" + std::to_string(i) + " 1M 64k"});
        images.push_back(small);
    }
    fs::path missing = dir_ / "missing.qcow2";
    images.insert(images.begin() + 2, missing);
    fs::path corrupt = dir_ / "corrupt.qcow2";
    test::make_image(corrupt, "cluster_size=64k", "1M", {"write -P 1 0 64k"});
    test::point_cluster_past_eof(corrupt, 0);
    images.insert(images.begin() + 4, corrupt);

    std::string args;
    for (const fs::path& p : images)
        args += " " + shell_quote(p.string());
    std::string expected_out;
    for (const fs::path& p : images) {
        if (p == missing || p == corrupt)
            continue;
        fs::path raw = dir_ / (p.stem().string() + ".raw");
        run_ok("qemu-img convert -O raw " + shell_quote(p.string()) + " " +
               shell_quote(raw.string()));
        expected_out += oracle_digest("sha256", raw) + "  " + p.string() + "\n";
    }
    for (std::string threads : {"1", "2", "3", "0"}) {
        CommandResult r = run(cli() + " hash --threads=" + threads + args);
        EXPECT_EQ(r.exit_code, 1) << threads;
        EXPECT_EQ(r.out, expected_out) << threads;
        // The errors in argument order too, one line each.
        ASSERT_TRUE(r.err.starts_with("qcowmap: " + missing.string() +
                                      ": No such file or directory\nqcowmap: " + corrupt.string() +
                                      ": "))
            << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 2) << r.err;
        EXPECT_NE(r.err.find("0x40000000000"), std::string::npos) << r.err;
    }

    // The library call: every image's result, in index order, equal to hash_image's.
    for (unsigned threads : {1u, 2u, 4u}) {
        std::vector<std::size_t> order;
        HashOptions options;
        options.threads = threads;
        auto ok = hash_images(
            images.size(), [&](std::size_t i) { return Image::open(images[i]); }, options,
            [&](std::size_t i, const Result<ImageDigest>& digest) -> Result<void> {
                order.push_back(i);
                if (images[i] == missing || images[i] == corrupt) {
                    EXPECT_FALSE(digest) << i;
                    return {};
                }
                auto image = Image::open(images[i]);
                EXPECT_TRUE(image);
                auto alone = hash_image(*image);
                EXPECT_TRUE(digest && alone) << i;
                if (digest && alone) {
                    EXPECT_EQ(digest->digest, *alone) << i;
                    EXPECT_EQ(digest->size, image->size()) << i;
                }
                return {};
            });
        EXPECT_TRUE(ok) << threads;
        EXPECT_EQ(order, (std::vector<std::size_t>{0, 1, 2, 3, 4, 5})) << threads;
    }
    // A sink error stops the call and comes back.
    std::size_t calls = 0;
    auto stopped = hash_images(
        images.size(), [&](std::size_t i) { return Image::open(images[i]); }, HashOptions{},
        [&](std::size_t, const Result<ImageDigest>&) -> Result<void> {
            ++calls;
            return Error{ErrorCode::io_error, "sink full"};
        });
    ASSERT_FALSE(stopped);
    EXPECT_EQ(stopped.error().message, "sink full");
    EXPECT_EQ(calls, 1u);
}

} // namespace
} // namespace qcowmap
