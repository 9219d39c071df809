// In-place writing (issue 27): create, open for writing, write, write_zeroes, discard, flush,
// resize, close. Every image kind is built with qemu-img; the same seeded workload is applied
// by qemu-io to one copy and by WritableImage to another, and qemu's tools judge the result:
// `qemu-img compare` identical, `qemu-img check` clean, `qemu-img map` equal where qemu
// allocates the same way, persistent bitmaps equal to what qemu-nbd reports.
#include "support.hpp"
#include "writable_io.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/writable.hpp>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <memory>
#include <random>
#include <regex>
#include <thread>

namespace qcowmap::test {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Workloads.

struct Op {
    enum Kind { write, zero, zero_unmap, discard, flush } kind = write;
    std::uint64_t offset = 0, length = 0;
    std::uint8_t pattern = 0;
};

std::string qemu_io_command(const Op& op) {
    switch (op.kind) {
    case Op::write:
        return fmt::format("write -P {:#x} {} {}", op.pattern, op.offset, op.length);
    case Op::zero:
        return fmt::format("write -z {} {}", op.offset, op.length);
    case Op::zero_unmap:
        return fmt::format("write -z -u {} {}", op.offset, op.length);
    case Op::discard:
        return fmt::format("discard {} {}", op.offset, op.length);
    case Op::flush:
        return "flush";
    }
    return {};
}

/// Seeded random requests over `size` bytes: whole clusters, runs of clusters, 512-byte pieces
/// inside clusters, (with `unaligned`) byte-granular pieces, near the start, L2 table
/// boundaries and the end of the disk.
std::vector<Op> random_workload(std::uint64_t seed, std::uint64_t size, std::uint64_t cluster,
                                int count, bool unaligned, bool with_discard = true) {
    std::mt19937_64 random(seed);
    auto pick = [&](std::uint64_t n) { return n ? random() % n : 0; };
    const std::uint64_t l2_coverage = cluster * (cluster / 8);
    std::vector<std::uint64_t> spots = {0, size / 2, size - std::min(size, 4 * cluster)};
    if (l2_coverage < size)
        spots.push_back(l2_coverage - std::min(l2_coverage, 2 * cluster));
    std::vector<Op> ops;
    for (int i = 0; i < count; ++i) {
        Op op;
        const unsigned kind = static_cast<unsigned>(pick(10));
        op.kind = kind < 6   ? Op::write
                  : kind < 7 ? Op::zero
                  : kind < 8 ? Op::zero_unmap
                  : kind < 9 ? (with_discard ? Op::discard : Op::write)
                             : Op::write;
        op.pattern = static_cast<std::uint8_t>(1 + pick(254));
        const std::uint64_t base = spots[pick(spots.size())] + pick(8) * cluster;
        switch (pick(4)) {
        case 0: // whole clusters
            op.offset = base / cluster * cluster;
            op.length = cluster * (1 + pick(4));
            break;
        case 1: // sectors inside or across clusters
            op.offset = (base + pick(cluster)) / 512 * 512;
            op.length = 512 * (1 + pick(2 * cluster / 512));
            break;
        case 2: // a few KiB
            op.offset = (base + pick(cluster)) / 4096 * 4096;
            op.length = 4096 * (1 + pick(4));
            break;
        default:
            if (unaligned) {
                op.offset = base + pick(cluster);
                op.length = 1 + pick(cluster + 1000);
            } else {
                op.offset = base / cluster * cluster;
                op.length = cluster;
            }
        }
        op.offset = std::min(op.offset, size - 512);
        op.length = std::min(op.length, size - op.offset);
        ops.push_back(op);
    }
    return ops;
}

void apply_qemu_io(const fs::path& image, const std::vector<Op>& ops,
                   const std::string& extra = "") {
    std::string command = "cd " + q(image.parent_path()) + " && qemu-io -f qcow2 " + extra;
    for (const Op& op : ops)
        command += " -c " + shell_quote(qemu_io_command(op));
    command += " " + q(image) + " >/dev/null";
    run_ok(command);
}

Result<void> apply_op(WritableImage& image, const Op& op) {
    switch (op.kind) {
    case Op::write: {
        std::vector<std::byte> data(op.length, std::byte{op.pattern});
        return image.write(op.offset, data);
    }
    case Op::zero:
        return image.write_zeroes(op.offset, op.length, false);
    case Op::zero_unmap:
        return image.write_zeroes(op.offset, op.length, true);
    case Op::discard:
        return image.discard(op.offset, op.length);
    case Op::flush:
        return image.flush();
    }
    return {};
}

void apply_ours(const fs::path& image, const std::vector<Op>& ops,
                const WritableOptions& options = {}) {
    auto writable = WritableImage::open(image, options);
    ASSERT_TRUE(writable) << writable.error().message;
    for (const Op& op : ops) {
        auto ok = apply_op(*writable, op);
        ASSERT_TRUE(ok) << qemu_io_command(op) << ": " << ok.error().message;
    }
    auto closed = writable->close();
    ASSERT_TRUE(closed) << closed.error().message;
}

/// `qemu-img map --output=json` without the host offsets (which depend on allocation order),
/// ranges that then read alike merged: one line "start length depth present zero data" each.
std::string map_without_offsets(const fs::path& image) {
    std::string map = run_ok("cd " + q(image.parent_path()) +
                             " && qemu-img map -f qcow2 --output=json " + q(image));
    static const std::regex entry(
        R"re("start": ([0-9]+), "length": ([0-9]+), "depth": ([0-9]+), "present": (\w+), "zero": (\w+), "data": (\w+))re");
    std::string out, last_kind;
    std::uint64_t start = 0, length = 0;
    for (auto it = std::sregex_iterator(map.begin(), map.end(), entry);
         it != std::sregex_iterator(); ++it) {
        const std::string kind =
            (*it)[3].str() + " " + (*it)[4].str() + " " + (*it)[5].str() + " " + (*it)[6].str();
        const std::uint64_t s0 = std::stoull((*it)[1].str()), n = std::stoull((*it)[2].str());
        if (kind == last_kind && start + length == s0) {
            length += n;
            continue;
        }
        if (!last_kind.empty())
            out += fmt::format("{} {} {}\n", start, length, last_kind);
        last_kind = kind;
        start = s0;
        length = n;
    }
    out += fmt::format("{} {} {}\n", start, length, last_kind);
    return out;
}

void expect_check_clean(const fs::path& image) {
    CommandResult check =
        run("cd " + q(image.parent_path()) + " && qemu-img check -f qcow2 " + q(image));
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
}

void expect_identical(const fs::path& a, const fs::path& b) {
    CommandResult compare = run("cd " + q(a.parent_path()) +
                                " && qemu-img compare -f qcow2 -F qcow2 " + q(a) + " " + q(b));
    EXPECT_EQ(compare.exit_code, 0) << compare.out << compare.err;
}

// ---------------------------------------------------------------------------------------------
// create

TEST(Create, MatchesQemuImgCreateForEachOption) {
    TempDir dir;
    run_ok("qemu-img create -q -f qcow2 " + q(dir / "base.qcow2") + " 3M");
    const std::vector<std::string> variants = {
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=16k,extended_l2=on",
        "extended_l2=on",
        "compression_type=zstd",
        "refcount_bits=1",
        "refcount_bits=64",
        "cluster_size=512,refcount_bits=8",
        "lazy_refcounts=on",
        "data_file=DIR/d.raw",
        "data_file=DIR/r.raw,data_file_raw=on",
        "backing_file=base.qcow2,backing_fmt=qcow2",
    };
    for (const std::string& options : variants) {
        SCOPED_TRACE(options);
        const fs::path ours = dir / "ours.qcow2", theirs = dir / "theirs.qcow2";
        const std::string ours_options =
            std::regex_replace(options, std::regex("DIR/"), dir.path().string() + "/");
        CreateOptions parsed;
        auto ok = parse_create_options(ours_options, parsed);
        ASSERT_TRUE(ok) << ok.error().message;
        auto made = create(ours, 5 * 1024 * 1024, parsed);
        ASSERT_TRUE(made) << made.error().message;
        const std::string qemu_options =
            std::regex_replace(options, std::regex("DIR/"), dir.path().string() + "/q");
        run_ok("cd " + q(dir.path()) + " && qemu-img create -q -f qcow2 " +
               (qemu_options.empty() ? "" : "-o " + shell_quote(qemu_options)) +
               " theirs.qcow2 5M");
        expect_check_clean(ours);
        // Everything `qemu-img info` says but the file names and sizes on disk.
        auto info = [&](const fs::path& image) {
            std::string json = run_ok("qemu-img info --output=json " + q(image));
            json = std::regex_replace(
                json, std::regex(R"re("(filename|actual-size|dirty-flag)"[^\n]*\n)re"), "");
            return std::regex_replace(json, std::regex(R"(q?[dr]\.raw|ours|theirs)"), "X");
        };
        EXPECT_EQ(info(ours), info(theirs));
        EXPECT_EQ(map_without_offsets(ours), map_without_offsets(theirs));
        // And it is writable by qemu: the same write lands the same way.
        for (const fs::path& image : {ours, theirs})
            run_ok("qemu-io -f qcow2 -c 'write -P 7 4096 70000' " + q(image) + " >/dev/null");
        expect_identical(ours, theirs);
        expect_check_clean(ours);
    }
}

TEST(Create, RefusesBadOptions) {
    TempDir dir;
    CreateOptions options;
    EXPECT_EQ(parse_create_options("cluster_size=3k", options).has_value(), true);
    auto made = create(dir / "a.qcow2", 1 << 20, options);
    ASSERT_FALSE(made);
    EXPECT_EQ(made.error().code, ErrorCode::invalid_argument);
    EXPECT_FALSE(parse_create_options("encrypt.format=luks", options));
    EXPECT_FALSE(parse_create_options("compat=0.9", options));
    CreateOptions v2;
    v2.version = 2;
    v2.extended_l2 = true;
    made = create(dir / "b.qcow2", 1 << 20, v2);
    ASSERT_FALSE(made);
    EXPECT_EQ(made.error().code, ErrorCode::invalid_argument);
    CreateOptions raw;
    raw.data_file_raw = true;
    EXPECT_FALSE(create(dir / "c.qcow2", 1 << 20, raw));
    CreateOptions backing;
    backing.backing_file = "missing.qcow2";
    made = create(dir / "d.qcow2", 0, backing);
    ASSERT_FALSE(made);
    EXPECT_EQ(made.error().code, ErrorCode::io_error);
    EXPECT_FALSE(fs::exists(dir / "d.qcow2"));
}

TEST(Create, SizeFromTheBackingFile) {
    TempDir dir;
    run_ok("qemu-img create -q -f qcow2 " + q(dir / "base.qcow2") + " 7M");
    CreateOptions options;
    options.backing_file = "base.qcow2";
    ASSERT_TRUE(create(dir / "top.qcow2", 0, options));
    auto image = Image::open(dir / "top.qcow2");
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->size(), 7u << 20);
    EXPECT_EQ(image->info().backing_format, std::optional<std::string>("qcow2"));
}

// ---------------------------------------------------------------------------------------------
// Random workloads against qemu-io on every image kind.

struct Kind {
    std::string name;
    std::string create_options; ///< qemu-img create -o
    std::uint64_t size;
    std::uint64_t cluster;
    /// How the starting image is filled: qemu-io commands, "compressed" (converted with -c from
    /// a filled image), "backing" (an empty overlay over a filled base), "snapshot" (filled,
    /// snapshotted, then the workload).
    std::string setup;
    bool unaligned = true;
};

class Workload : public ::testing::TestWithParam<Kind> {};

void fill_with_qemu(const fs::path& image, std::uint64_t size, std::uint64_t cluster) {
    std::vector<Op> fill = random_workload(99, size, cluster, 12, false, false);
    apply_qemu_io(image, fill);
}

TEST_P(Workload, SameAsQemuIo) {
    const Kind& kind = GetParam();
    TempDir dir;
    // Backing files are named by absolute paths; each copy gets its own data file (qemu opens
    // a relative data file name from its working directory: the helpers run it in `dir`).
    const fs::path start = dir / "start.qcow2";
    const std::string size = std::to_string(kind.size);
    std::string options = kind.create_options;
    auto add_option = [&](const std::string& option) {
        options += (options.empty() ? "" : ",") + option;
    };
    if (kind.setup == "backing") {
        run_ok("qemu-img create -q -f qcow2 " + q(dir / "base.qcow2") + " " + size);
        fill_with_qemu(dir / "base.qcow2", kind.size, kind.cluster);
        add_option("backing_file=" + (dir / "base.qcow2").string() + ",backing_fmt=qcow2");
    }
    if (kind.setup == "raw-backing") {
        run_ok("head -c " + size + " /dev/urandom > " + q(dir / "base.raw"));
        add_option("backing_file=" + (dir / "base.raw").string() + ",backing_fmt=raw");
    }
    const bool data_file = kind.setup.starts_with("datafile");
    if (data_file) {
        add_option("data_file=start.data");
        if (kind.setup == "datafile-raw")
            add_option("data_file_raw=on");
    }
    run_ok("cd " + q(dir.path()) + " && qemu-img create -q -f qcow2 " +
           (options.empty() ? "" : "-o " + shell_quote(options)) + " " + q(start) + " " + size);
    if (kind.setup == "filled" || kind.setup == "snapshot" || kind.setup == "compressed" ||
        kind.setup == "bitmap" || data_file)
        fill_with_qemu(start, kind.size, kind.cluster);
    if (kind.setup == "compressed") {
        const fs::path compressed = dir / "c.qcow2";
        run_ok("qemu-img convert -c -f qcow2 -O qcow2 -o " +
               shell_quote("cluster_size=" + std::to_string(kind.cluster) +
                           (options.empty() ? "" : "," + options)) +
               " " + q(start) + " " + q(compressed) + " && mv " + q(compressed) + " " + q(start));
    }
    if (kind.setup == "snapshot")
        run_ok("qemu-img snapshot -c s1 " + q(start));
    if (kind.setup == "bitmap") {
        run_ok("qemu-img bitmap --add -g 16k " + q(start) + " b0");
        run_ok("qemu-img bitmap --add -g 64k " + q(start) + " b1");
        run_ok("qemu-img bitmap --add --disable " + q(start) + " off");
    }
    const fs::path theirs = dir / "theirs.qcow2", ours = dir / "ours.qcow2";
    for (int seed = 1; seed <= 2; ++seed) {
        SCOPED_TRACE(fmt::format("seed {}", seed));
        for (const char* copy : {"theirs", "ours"}) {
            run_ok("cp " + q(start) + " " + q(dir / (copy + std::string(".qcow2"))));
            if (data_file) {
                run_ok(fmt::format("cd {} && cp start.data {}.data && qemu-img amend -f qcow2 -o "
                                   "data_file={}.data {}.qcow2",
                                   q(dir.path()), copy, copy, copy));
            }
        }
        std::vector<Op> ops = random_workload(seed, kind.size, kind.cluster, 60, kind.unaligned);
        auto copies = [&] {
            for (const char* copy : {"theirs", "ours"}) {
                run_ok("cp " + q(start) + " " + q(dir / (copy + std::string(".qcow2"))));
                if (data_file) {
                    run_ok(fmt::format("cd {} && cp start.data {}.data && qemu-img amend -f qcow2 "
                                       "-o data_file={}.data {}.qcow2",
                                       q(dir.path()), copy, copy, copy));
                }
            }
        };
        apply_qemu_io(theirs, ops);
        apply_ours(ours, ops);
        const bool same =
            run("cd " + q(dir.path()) + " && qemu-img compare -q " + q(theirs) + " " + q(ours))
                .exit_code == 0;
        const bool same_map =
            kind.unaligned || map_without_offsets(ours) == map_without_offsets(theirs);
        if ((!same || !same_map) && std::getenv("QCOWMAP_BISECT")) {
            // Diagnostics: the shortest prefix of the workload that differs.
            for (std::size_t k = 1; k <= ops.size(); ++k) {
                copies();
                std::vector<Op> prefix(ops.begin(), ops.begin() + static_cast<long>(k));
                apply_qemu_io(theirs, prefix);
                apply_ours(ours, prefix);
                if (run("cd " + q(dir.path()) + " && qemu-img compare -q " + q(theirs) + " " +
                        q(ours))
                            .exit_code != 0 ||
                    (!kind.unaligned && map_without_offsets(ours) != map_without_offsets(theirs))) {
                    std::string trail;
                    for (std::size_t i = 0; i < k; ++i)
                        trail += "  " + qemu_io_command(ops[i]) + "\n";
                    std::string fill;
                    for (const Op& op :
                         random_workload(99, kind.size, kind.cluster, 12, false, false))
                        fill += "  " + qemu_io_command(op) + "\n";
                    ADD_FAILURE() << "fill:\n"
                                  << fill << "first difference after op " << k << ":\n"
                                  << trail;
                    break;
                }
            }
            copies();
            apply_qemu_io(theirs, ops);
            apply_ours(ours, ops);
        }
        expect_identical(theirs, ours);
        expect_check_clean(ours);
        if (!kind.unaligned) {
            EXPECT_EQ(map_without_offsets(ours), map_without_offsets(theirs));
        }
        if (kind.setup == "snapshot") {
            // The snapshot still reads as it did before the workload.
            auto raw = [&](const fs::path& image, const char* out) {
                run_ok("qemu-img convert -l snapshot.name=s1 -O raw " + q(image) + " " +
                       q(dir / out));
                return read_file(dir / out);
            };
            EXPECT_EQ(raw(ours, "ours.raw"), raw(start, "start.raw"));
        }
        if (kind.setup == "bitmap") {
            for (const char* name : {"b0", "b1", "off"}) {
                auto map = [&](const fs::path& image) {
                    return run_ok(fmt::format("nbdinfo --map=qemu:dirty-bitmap:{} -- [ qemu-nbd -r "
                                              "-f qcow2 -B {} {} ]",
                                              name, name, q(image)));
                };
                EXPECT_EQ(map(ours), map(theirs)) << name;
            }
        }
        if (kind.setup == "datafile-raw") {
            // The raw data file is the disk.
            CommandResult same =
                run("cd " + q(dir.path()) + " && qemu-img compare -f raw -F qcow2 " +
                    q(dir / "ours.data") + " " + q(theirs));
            EXPECT_EQ(same.exit_code, 0) << same.out << same.err;
        }
    }
}

std::string kind_name(const ::testing::TestParamInfo<Kind>& info) {
    return info.param.name;
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, Workload,
    ::testing::Values(Kind{"v3", "", 8 << 20, 65536, "filled"},
                      Kind{"v3Aligned", "", 8 << 20, 65536, "filled", false},
                      Kind{"v2", "compat=0.10", 8 << 20, 65536, "filled"},
                      Kind{"v2Aligned", "compat=0.10", 8 << 20, 65536, "filled", false},
                      Kind{"Cluster512", "cluster_size=512", 2 << 20, 512, "filled"},
                      Kind{"Cluster512Refcount64", "cluster_size=512,refcount_bits=64", 2 << 20,
                           512, "filled"},
                      Kind{"Cluster2M", "cluster_size=2M", 16 << 20, 2 << 20, "filled"},
                      Kind{"Refcount1", "cluster_size=4k,refcount_bits=1", 4 << 20, 4096, "filled"},
                      Kind{"ExtendedL2", "extended_l2=on", 8 << 20, 65536, "filled"},
                      Kind{"ExtendedL2Aligned", "extended_l2=on,cluster_size=16k", 4 << 20, 16384,
                           "filled", false},
                      Kind{"Compressed", "", 8 << 20, 65536, "compressed"},
                      Kind{"CompressedZstd", "compression_type=zstd,cluster_size=16k", 4 << 20,
                           16384, "compressed"},
                      Kind{"Backing", "", 8 << 20, 65536, "backing"},
                      Kind{"BackingExtendedL2", "extended_l2=on", 8 << 20, 65536, "backing"},
                      Kind{"BackingV2", "compat=0.10", 8 << 20, 65536, "backing"},
                      Kind{"RawBacking", "cluster_size=4k", 2 << 20, 4096, "raw-backing"},
                      Kind{"Snapshot", "", 8 << 20, 65536, "snapshot"},
                      Kind{"SnapshotSmallClusters", "cluster_size=1k", 2 << 20, 1024, "snapshot"},
                      Kind{"Bitmaps", "", 8 << 20, 65536, "bitmap"},
                      Kind{"LargeL2Span", "cluster_size=1k", 64 << 20, 1024, "filled"},
                      Kind{"DataFile", "", 8 << 20, 65536, "datafile"},
                      Kind{"DataFileExtendedL2", "extended_l2=on", 8 << 20, 65536, "datafile"},
                      Kind{"DataFileRaw", "", 8 << 20, 65536, "datafile-raw"}),
    kind_name);

// ---------------------------------------------------------------------------------------------
// Reads see the writes; growth.

TEST(Writable, ReadsSeeUnflushedWrites) {
    TempDir dir;
    ASSERT_TRUE(create(dir / "a.qcow2", 4 << 20));
    auto image = WritableImage::open(dir / "a.qcow2");
    ASSERT_TRUE(image) << image.error().message;
    std::vector<std::byte> data(10000, std::byte{0x5a});
    ASSERT_TRUE(image->write(70000, data));
    std::vector<std::byte> back(12000);
    auto n = image->read(back, 69000);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, back.size());
    EXPECT_EQ(back[999], std::byte{0});
    EXPECT_EQ(back[1000], std::byte{0x5a});
    EXPECT_EQ(back[10999], std::byte{0x5a});
    EXPECT_EQ(back[11000], std::byte{0});
    auto status = image->block_status(65536, 1 << 20);
    ASSERT_TRUE(status);
    EXPECT_TRUE(status->allocated);
    EXPECT_EQ(status->length, 65536u); // cluster 1 only (65536..131071)
    auto view = image->snapshot_view();
    ASSERT_TRUE(view) << view.error().message;
    std::vector<std::byte> seen(10000);
    ASSERT_TRUE(view->read(seen, 70000));
    EXPECT_EQ(seen, data);
    ASSERT_TRUE(image->close());
    expect_check_clean(dir / "a.qcow2");
}

TEST(Writable, DirectDataWritesReadBackAndMixWithBufferedOnes) {
    // direct_data_writes: whole pages go out with O_DIRECT; what the image reads back (its own
    // reads, a snapshot view, qemu-io after closing) is what was written, also where a
    // buffered partial write lands in a cluster written directly before.
    TempDir dir;
    ASSERT_TRUE(create(dir / "a.qcow2", 4 << 20));
    WritableOptions options;
    options.direct_data_writes = true;
    auto image = WritableImage::open(dir / "a.qcow2", options);
    ASSERT_TRUE(image) << image.error().message;
    std::unique_ptr<std::byte, decltype(&std::free)> page_aligned(
        static_cast<std::byte*>(std::aligned_alloc(4096, 262144)), &std::free);
    ASSERT_TRUE(page_aligned);
    std::fill_n(page_aligned.get(), 262144, std::byte{0x11});
    ASSERT_TRUE(image->write(65536, std::span<const std::byte>(page_aligned.get(), 262144)));
    std::vector<std::byte> patch(1000, std::byte{0x22}); // unaligned: buffered
    ASSERT_TRUE(image->write(65536 + 5000, patch));
    std::vector<std::byte> back(262144);
    auto n = image->read(back, 65536);
    ASSERT_TRUE(n);
    EXPECT_EQ(back[4999], std::byte{0x11});
    EXPECT_EQ(back[5000], std::byte{0x22});
    EXPECT_EQ(back[5999], std::byte{0x22});
    EXPECT_EQ(back[6000], std::byte{0x11});
    EXPECT_EQ(back[262143], std::byte{0x11});
    ASSERT_TRUE(image->flush());
    auto view = image->snapshot_view();
    ASSERT_TRUE(view) << view.error().message;
    std::vector<std::byte> seen(1000);
    ASSERT_TRUE(view->read(seen, 65536 + 5000));
    EXPECT_EQ(seen, patch);
    ASSERT_TRUE(image->close());
    expect_check_clean(dir / "a.qcow2");
    run_ok("qemu-io -f qcow2 -c 'read -P 0x11 64k 5000' -c 'read -P 0x22 70536 1000' -c 'read -P "
           "0x11 71536 254608' " +
           q(dir / "a.qcow2") + " >/dev/null");
}

TEST(Writable, RefcountTableGrowsAndL1Grows) {
    TempDir dir;
    // 512-byte clusters with 64-bit refcounts: a refcount block counts 64 clusters, the first
    // refcount table 64 blocks (2 MiB of file), so a few MiB of data outgrow both.
    run_ok("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " +
           q(dir / "a.qcow2") + " 1M");
    run_ok("cp " + q(dir / "a.qcow2") + " " + q(dir / "b.qcow2"));
    {
        auto image = WritableImage::open(dir / "a.qcow2");
        ASSERT_TRUE(image) << image.error().message;
        ASSERT_TRUE(image->resize(8 << 20));
        std::vector<std::byte> data(1 << 20);
        for (int i = 0; i < 6; ++i) {
            std::fill(data.begin(), data.end(), std::byte(i + 1));
            auto ok = image->write(std::uint64_t(i) << 20, data);
            ASSERT_TRUE(ok) << ok.error().message;
        }
        ASSERT_TRUE(image->close());
    }
    run_ok("qemu-img resize -q " + q(dir / "b.qcow2") + " 8M");
    std::string io;
    for (int i = 0; i < 6; ++i)
        io += fmt::format(" -c 'write -P {} {} 1M'", i + 1, i << 20);
    run_ok("qemu-io -f qcow2" + io + " " + q(dir / "b.qcow2") + " >/dev/null");
    expect_identical(dir / "a.qcow2", dir / "b.qcow2");
    expect_check_clean(dir / "a.qcow2");
    EXPECT_NE(peek_be(dir / "a.qcow2", 48, 8), 512u) << "the refcount table moved";
}

TEST(Writable, GrowWithBackingReadsZerosPastTheOldEnd) {
    TempDir dir;
    run_ok("qemu-img create -q -f qcow2 " + q(dir / "base.qcow2") + " 4M");
    run_ok("qemu-io -f qcow2 -c 'write -P 9 0 4M' " + q(dir / "base.qcow2") + " >/dev/null");
    run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(dir / "top.qcow2") + " 1M");
    run_ok("cp " + q(dir / "top.qcow2") + " " + q(dir / "qtop.qcow2"));
    {
        auto image = WritableImage::open(dir / "top.qcow2");
        ASSERT_TRUE(image) << image.error().message;
        ASSERT_TRUE(image->resize(3 << 20));
        ASSERT_TRUE(image->close());
    }
    run_ok("qemu-img resize -q " + q(dir / "qtop.qcow2") + " 3M");
    expect_identical(dir / "top.qcow2", dir / "qtop.qcow2");
    expect_check_clean(dir / "top.qcow2");
}

TEST(Writable, ShrinkOnlyAnUnallocatedTail) {
    TempDir dir;
    ASSERT_TRUE(create(dir / "a.qcow2", 4 << 20));
    auto image = WritableImage::open(dir / "a.qcow2");
    ASSERT_TRUE(image);
    std::vector<std::byte> data(4096, std::byte{1});
    ASSERT_TRUE(image->write(3 << 20, data));
    auto refused = image->resize(2 << 20);
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code, ErrorCode::invalid_argument);
    ASSERT_TRUE(image->discard(3 << 20, 1 << 20));
    ASSERT_TRUE(image->flush());
    ASSERT_TRUE(image->write_zeroes(3 << 20, 1 << 20, true));
    auto shrunk = image->resize(2 << 20);
    EXPECT_FALSE(shrunk) << "zero clusters are still allocated entries";
    ASSERT_TRUE(image->close());
}

TEST(Writable, UnknownAutoclearBitsAreClearedBeforeWriting) {
    TempDir dir;
    ASSERT_TRUE(create(dir / "a.qcow2", 1 << 20));
    poke_be(dir / "a.qcow2", 88, std::uint64_t{1} << 7, 8); // a feature qcowmap does not know
    auto image = WritableImage::open(dir / "a.qcow2");
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(peek_be(dir / "a.qcow2", 88, 8), 0u);
    ASSERT_TRUE(image->close());
    expect_check_clean(dir / "a.qcow2");
}

TEST(Writable, BitmapsAreInUseWhileOpenAndStoredOnClose) {
    TempDir dir;
    const fs::path path = dir / "a.qcow2";
    run_ok("qemu-img create -q -f qcow2 " + q(path) + " 4M");
    run_ok("qemu-img bitmap --add " + q(path) + " b0");
    run_ok("qemu-img bitmap --add --disable " + q(path) + " off");
    auto flags = [&] {
        OpenOptions shared; // the writer holds the image: read it as qemu-img -U would
        shared.force_share = true;
        auto view = Image::open(path, shared);
        EXPECT_TRUE(view) << view.error().message;
        std::vector<bool> in_use;
        for (const BitmapEntry& e : view->info().bitmaps->entries)
            in_use.push_back(e.in_use());
        return in_use;
    };
    {
        auto image = WritableImage::open(path);
        ASSERT_TRUE(image) << image.error().message;
        // Enabled bitmaps carry in_use on disk from the open on; disabled ones do not change.
        EXPECT_EQ(flags(), (std::vector<bool>{true, false}));
        std::vector<std::byte> data(4096, std::byte{1});
        ASSERT_TRUE(image->write(3 << 20, data));
        ASSERT_TRUE(image->close());
    }
    EXPECT_EQ(flags(), (std::vector<bool>{false, false}));
    expect_check_clean(path);
    const std::string map = run_ok(
        "nbdinfo --map=qemu:dirty-bitmap:b0 -- [ qemu-nbd -r -f qcow2 -B b0 " + q(path) + " ]");
    EXPECT_NE(map.find("3145728       65536    1  dirty"), std::string::npos) << map;
}

TEST(Threads, OneWritableImageFromSeveralThreads) {
    // Calls are serialised inside: writers, readers and flushes on four threads (run under
    // ThreadSanitizer by scripts/test.sh).
    TempDir dir;
    CreateOptions options;
    options.cluster_size = 4096;
    ASSERT_TRUE(create(dir / "a.qcow2", 8 << 20, options));
    auto image = WritableImage::open(dir / "a.qcow2");
    ASSERT_TRUE(image);
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            std::vector<std::byte> data(12288, std::byte(t + 1)), back(12288);
            for (int i = 0; i < 40; ++i) {
                const std::uint64_t offset = (std::uint64_t(i) * 4 + t) * 16384;
                if (!image->write(offset, data) || !image->read(back, offset) || back != data)
                    ++failures;
                if (i % 10 == 9 && !image->flush())
                    ++failures;
                if (i % 7 == 0 && !image->block_status(offset, 16384))
                    ++failures;
            }
        });
    }
    for (std::thread& thread : threads)
        thread.join();
    EXPECT_EQ(failures.load(), 0);
    ASSERT_TRUE(image->close());
    expect_check_clean(dir / "a.qcow2");
    run_ok("qemu-io -c 'read -P 1 0 12k' -c 'read -P 4 " + std::to_string((39 * 4 + 3) * 16384) +
           " 12k' " + q(dir / "a.qcow2") + " >/dev/null");
}

// ---------------------------------------------------------------------------------------------
// Bad input: one clear error each, and the image not left worse.

TEST(Refuse, WritesPastTheEndAndClosedImages) {
    TempDir dir;
    ASSERT_TRUE(create(dir / "a.qcow2", 1 << 20));
    auto image = WritableImage::open(dir / "a.qcow2");
    ASSERT_TRUE(image);
    std::vector<std::byte> data(4096);
    auto past = image->write((1 << 20) - 100, data);
    ASSERT_FALSE(past);
    EXPECT_EQ(past.error().code, ErrorCode::out_of_range);
    EXPECT_FALSE(image->write_zeroes(1 << 20, 1));
    EXPECT_FALSE(image->discard(UINT64_MAX - 10, 100));
    ASSERT_TRUE(image->close());
    auto closed = image->write(0, data);
    ASSERT_FALSE(closed);
    EXPECT_EQ(closed.error().code, ErrorCode::invalid_argument);
}

TEST(Refuse, ImagesThatCannotBeWritten) {
    TempDir dir;
    // qcow version 1.
    run_ok("qemu-img create -q -f qcow " + q(dir / "v1.qcow") + " 1M");
    auto v1 = WritableImage::open(dir / "v1.qcow");
    ASSERT_FALSE(v1);
    EXPECT_EQ(v1.error().code, ErrorCode::unsupported_version);
    EXPECT_NE(v1.error().message.find("qcow version 1"), std::string::npos);
    // The corrupt bit, the dirty bit, an unknown incompatible bit.
    for (auto [bit, code] :
         std::vector<std::pair<int, ErrorCode>>{{1, ErrorCode::unsupported_feature},
                                                {0, ErrorCode::unsupported_feature},
                                                {9, ErrorCode::unsupported_feature}}) {
        const fs::path image = dir / fmt::format("bit{}.qcow2", bit);
        run_ok("qemu-img create -q -f qcow2 " + q(image) + " 1M");
        poke_be(image, 72, std::uint64_t{1} << bit, 8);
        const auto before = read_file(image);
        auto opened = WritableImage::open(image);
        ASSERT_FALSE(opened) << bit;
        EXPECT_EQ(opened.error().code, code) << opened.error().message;
        EXPECT_EQ(read_file(image), before);
    }
    // Encrypted.
    make_luks_image(dir / "luks.qcow2", "1M");
    auto luks = WritableImage::open(dir / "luks.qcow2");
    ASSERT_FALSE(luks);
    EXPECT_EQ(luks.error().code, ErrorCode::encrypted);
    // A raw file, a snapshot.
    run_ok("head -c 65536 /dev/zero > " + q(dir / "raw.img"));
    EXPECT_FALSE(WritableImage::open(dir / "raw.img"));
    ASSERT_TRUE(create(dir / "s.qcow2", 1 << 20));
    run_ok("qemu-img snapshot -c s1 " + q(dir / "s.qcow2"));
    WritableOptions snapshot;
    snapshot.open.snapshot = "s1";
    auto snap = WritableImage::open(dir / "s.qcow2", snapshot);
    ASSERT_FALSE(snap);
    EXPECT_EQ(snap.error().code, ErrorCode::invalid_argument);
    // A read-only file.
    ASSERT_TRUE(create(dir / "ro.qcow2", 1 << 20));
    fs::permissions(dir / "ro.qcow2", fs::perms::owner_read);
    if (::geteuid() != 0) {
        auto ro = WritableImage::open(dir / "ro.qcow2");
        ASSERT_FALSE(ro);
        EXPECT_EQ(ro.error().code, ErrorCode::io_error);
    }
}

TEST(Refuse, DamagedTableWhereTheWriteGoes) {
    TempDir dir;
    run_ok("qemu-img create -q -f qcow2 " + q(dir / "a.qcow2") + " 1M");
    run_ok("qemu-io -f qcow2 -c 'write -P 1 0 64k' " + q(dir / "a.qcow2") + " >/dev/null");
    // L1 entry 0 points at an unaligned L2 table.
    const std::uint64_t l1 = peek_be(dir / "a.qcow2", 40, 8);
    poke_be(dir / "a.qcow2", l1, (std::uint64_t{1} << 63) | 0x50200, 8);
    const auto before = read_file(dir / "a.qcow2");
    // The check at open refuses it.
    auto refused = WritableImage::open(dir / "a.qcow2");
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code, ErrorCode::invalid_table);
    EXPECT_NE(refused.error().message.find("qemu-img check -r all"), std::string::npos)
        << refused.error().message;
    // Without it, the request that meets the damage is refused and nothing changes.
    WritableOptions unchecked;
    unchecked.check = false;
    auto image = WritableImage::open(dir / "a.qcow2", unchecked);
    ASSERT_TRUE(image) << image.error().message;
    std::vector<std::byte> data(512, std::byte{2});
    auto ok = image->write(0, data);
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().code, ErrorCode::invalid_table) << ok.error().message;
    ASSERT_TRUE(image->close());
    EXPECT_EQ(read_file(dir / "a.qcow2"), before);
}

TEST(Refuse, ClusterPastTheEndOfTheFile) {
    TempDir dir;
    run_ok("qemu-img create -q -f qcow2 " + q(dir / "a.qcow2") + " 1M");
    run_ok("qemu-io -f qcow2 -c 'write -P 1 0 64k' " + q(dir / "a.qcow2") + " >/dev/null");
    point_cluster_past_eof(dir / "a.qcow2", 0);
    const auto before = read_file(dir / "a.qcow2");
    WritableOptions unchecked;
    unchecked.check = false;
    auto image = WritableImage::open(dir / "a.qcow2", unchecked);
    ASSERT_TRUE(image) << image.error().message;
    std::vector<std::byte> data(512, std::byte{2});
    auto ok = image->write(0, data);
    ASSERT_FALSE(ok);
    EXPECT_EQ(ok.error().code, ErrorCode::invalid_cluster) << ok.error().message;
    ASSERT_TRUE(image->close());
    EXPECT_EQ(read_file(dir / "a.qcow2"), before) << "the file did not grow to 4 TiB";
}

TEST(Refuse, RefcountsThatMissAUsedCluster) {
    // A data cluster whose refcount says free: allocating it would overwrite live data.
    TempDir dir;
    run_ok("qemu-img create -q -f qcow2 " + q(dir / "a.qcow2") + " 1M");
    run_ok("qemu-io -f qcow2 -c 'write -P 1 0 64k' " + q(dir / "a.qcow2") + " >/dev/null");
    const std::uint64_t refblock = peek_be(dir / "a.qcow2", peek_be(dir / "a.qcow2", 48, 8), 8);
    poke_be(dir / "a.qcow2", refblock + 5 * 2, 0, 2); // cluster 5 (the data) refcount 0
    auto refused = WritableImage::open(dir / "a.qcow2");
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code, ErrorCode::invalid_table) << refused.error().message;
}

// ---------------------------------------------------------------------------------------------
// QEMU's image locks.

TEST(Locks, QemuAndQcowmapExcludeEachOther) {
    TempDir dir;
    ASSERT_TRUE(create(dir / "a.qcow2", 1 << 20));
    {
        auto image = WritableImage::open(dir / "a.qcow2");
        ASSERT_TRUE(image);
        CommandResult io = run("qemu-io -f qcow2 -c 'write 0 512' " + q(dir / "a.qcow2"));
        EXPECT_NE(io.exit_code, 0);
        EXPECT_NE(io.err.find("lock"), std::string::npos) << io.err;
        CommandResult info = run("qemu-img info " + q(dir / "a.qcow2"));
        EXPECT_NE(info.exit_code, 0);
        EXPECT_EQ(run("qemu-img info -U " + q(dir / "a.qcow2")).exit_code, 0);
        // A reader is refused as qemu-img's is (its lock denies the write we hold), unless it
        // shares (-U).
        auto reader = Image::open(dir / "a.qcow2");
        ASSERT_FALSE(reader);
        EXPECT_EQ(reader.error().code, ErrorCode::image_in_use) << reader.error().message;
        OpenOptions shared;
        shared.force_share = true;
        EXPECT_TRUE(Image::open(dir / "a.qcow2", shared));
        ASSERT_TRUE(image->close());
    }
    // qemu-io holds the image open for writing while it waits for commands on its stdin.
    bool held = false;
    Result<WritableImage> refused = Error{ErrorCode::invalid_argument, "not tried"};
    {
        QemuIoHolder qemu_io(dir / "a.qcow2");
        held = qemu_io.held();
        refused = WritableImage::open(dir / "a.qcow2");
    }
    ASSERT_TRUE(held) << "qemu-io never took its lock";
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.error().code, ErrorCode::image_in_use);
    EXPECT_NE(refused.error().message.find("lock"), std::string::npos) << refused.error().message;
    EXPECT_TRUE(WritableImage::open(dir / "a.qcow2")) << "qemu-io's locks went with it";
}

} // namespace
} // namespace qcowmap::test
