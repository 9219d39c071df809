// `qcowmap check` against `qemu-img check --output=json` as the oracle: clean images of every
// kind qemu makes, and images damaged in known ways (refcounts bumped, zeroed, table entries
// unaligned or with reserved bits, references past the end of the file...). Every case asserts
// the counts of both tools are equal, that the exit status is qemu-img's, and what the damage
// must have produced (so that agreement on "nothing found" cannot hide a no-op patch).
#include "support.hpp"

#include <qcowmap/check.hpp>
#include <qcowmap/format.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace qcowmap;
namespace qt = qcowmap::test;
using qt::Buffer;
using qt::get_be;
using qt::put_be;

constexpr std::uint64_t kOffsetMask = 0x00fffffffffffe00ULL;

/// Header geometry of a v3 image, enough to find refcount entries and the first L2 table.
struct Geometry {
    unsigned cluster_bits;
    std::uint64_t cluster_size, l1_offset, refcount_table_offset;
    unsigned refcount_order;
    explicit Geometry(const Buffer& b)
        : cluster_bits(static_cast<unsigned>(get_be(b, 20, 4))),
          cluster_size(std::uint64_t{1} << cluster_bits), l1_offset(get_be(b, 40, 8)),
          refcount_table_offset(get_be(b, 48, 8)),
          refcount_order(get_be(b, 4, 4) == 3 ? static_cast<unsigned>(get_be(b, 96, 4)) : 4) {}
    std::uint64_t l2(const Buffer& b, unsigned l1_index = 0) const {
        return get_be(b, l1_offset + 8 * l1_index, 8) & kOffsetMask;
    }
    /// Refcount of `cluster` (widths of 8 bits and more, which these tests use).
    std::uint64_t entry_at(const Buffer& b, std::uint64_t cluster) const {
        const unsigned bits = cluster_bits + 3 - refcount_order;
        const std::uint64_t block =
            get_be(b, refcount_table_offset + 8 * (cluster >> bits), 8) & ~std::uint64_t{0x1ff};
        return block + (cluster & ((1ULL << bits) - 1)) * ((1u << refcount_order) / 8);
    }
    std::uint64_t refcount(const Buffer& b, std::uint64_t cluster) const {
        return get_be(b, entry_at(b, cluster), (1u << refcount_order) / 8);
    }
    void set_refcount(Buffer& b, std::uint64_t cluster, std::uint64_t value) const {
        put_be(b, entry_at(b, cluster), value, (1u << refcount_order) / 8);
    }
};

using Counts = std::map<std::string, std::uint64_t>;
const std::vector<std::string> kKeys = {
    "check-errors",   "image-end-offset",   "corruptions",         "leaks",
    "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters"};

/// The numeric fields of a check JSON report; absent keys (qemu omits zeros) read as 0.
Counts parse_counts(const std::string& json) {
    Counts counts;
    for (const auto& key : kKeys)
        counts[key] = 0;
    static const std::regex field("\"([a-z-]+)\": ([0-9]+)");
    for (std::sregex_iterator it(json.begin(), json.end(), field), end; it != end; ++it) {
        counts[(*it)[1].str()] = std::stoull((*it)[2].str());
    }
    return counts;
}

struct Report {
    int exit_code;
    Counts counts;
    std::string err;
};

Report qemu_check(const std::filesystem::path& image) {
    auto r = qt::run("qemu-img check --output=json " + qt::shell_quote(image.string()));
    return {r.exit_code, parse_counts(r.out), r.err};
}
Report our_check(const std::filesystem::path& image) {
    auto r = qt::run(qt::qcowmap_bin() + " check --json " + qt::shell_quote(image.string()));
    return {r.exit_code, parse_counts(r.out), r.err};
}

/// Both tools agree on every count and the exit status; the library agrees with the CLI.
testing::AssertionResult agrees_with_qemu(const std::filesystem::path& image) {
    const Report qemu = qemu_check(image);
    const Report ours = our_check(image);
    std::string diff;
    for (const auto& key : kKeys) {
        if (qemu.counts.at(key) != ours.counts.at(key)) {
            diff +=
                fmt::format(" {}: qemu {} ours {};", key, qemu.counts.at(key), ours.counts.at(key));
        }
    }
    if (qemu.exit_code != ours.exit_code) {
        diff += fmt::format(" exit: qemu {} ours {};", qemu.exit_code, ours.exit_code);
    }
    auto lib = check_image(image);
    if (!lib) {
        diff += " library: " + lib.error().message;
    } else if (lib->corruptions != ours.counts.at("corruptions") ||
               lib->leaks != ours.counts.at("leaks") || lib->exit_code() != ours.exit_code) {
        diff += " library and CLI differ;";
    }
    if (!diff.empty()) {
        return testing::AssertionFailure() << image.filename() << ":" << diff << "\nqemu stderr:\n"
                                           << qemu.err << "ours stderr:\n"
                                           << ours.err;
    }
    return testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Clean images of every kind.

struct CleanCase {
    const char* name;
    const char* options;
    const char* size;
    std::vector<std::string> io;
    std::function<void(const std::filesystem::path&)> after = {};
};

void snapshot(const std::filesystem::path& image, const std::string& args) {
    qt::run_ok("qemu-img snapshot " + args + " " + qt::shell_quote(image.string()));
}
void io(const std::filesystem::path& image, const std::string& command) {
    qt::run_ok("qemu-io -f qcow2 -c " + qt::shell_quote(command) + " " +
               qt::shell_quote(image.string()) + " >/dev/null");
}

std::vector<CleanCase> clean_cases() {
    std::vector<CleanCase> cases = {
        {"plain", "", "16M", {"write -P 1 0 1M", "write -P 2 8M 64k", "discard 0 64k"}},
        {"empty", "", "1G", {}},
        {"version2", "compat=0.10", "16M", {"write -P 1 0 1M"}},
        {"small_clusters",
         "cluster_size=512",
         "64M",
         {"write -P 1 0 100k", "write -P 1 40M 100k", "write -c 20M 4k"}},
        {"large_clusters", "cluster_size=2M", "64M", {"write -P 1 0 3M", "write -P 2 33M 1k"}},
        {"compressed_zlib", "cluster_size=4k", "16M", {"write -c -P 1 0 64k", "write -P 2 1M 64k"}},
        {"compressed_zstd",
         "compression_type=zstd,cluster_size=512",
         "1M",
         {"write -c -P 1 0 64k"}},
        {"fragmented",
         "cluster_size=4k",
         "4M",
         {"write -P 1 1M 4k", "write -P 2 0 4k", "write -P 3 2M 8k", "write -P 4 8k 4k",
          "write -c -P 5 3M 4k"}},
        {"extended_l2",
         "extended_l2=on",
         "16M",
         {"write -P 1 4k 4k", "write -z 1M 64k", "write -P 3 2M 1M"}},
        {"extended_l2_partial",
         "extended_l2=on,cluster_size=16k",
         "4M",
         {"write -P 1 2k 1k", "write -z 64k 16k", "write -P 1 1M 16k", "discard 1M 8k"}},
        {"preallocated_metadata", "preallocation=metadata", "16M", {}},
        {"zero_clusters",
         "preallocation=metadata,cluster_size=4k",
         "1M",
         {"write -z 0 64k", "write -P 1 128k 4k"}},
        {"lazy_refcounts_clean", "lazy_refcounts=on", "16M", {"write -P 1 0 1M"}},
        {"large_sparse", "", "8G", {"write -P 1 5G 64k"}},
        {"external_data_file", "data_file=DIR/data.raw", "16M", {"write -P 1 0 1M"}},
    };
    cases.push_back(
        {"refcount_bits_1", "refcount_bits=1,cluster_size=4k", "1M", {"write -P 1 0 64k"}});
    cases.push_back({"refcount_bits_2", "refcount_bits=2", "8M", {"write -P 1 0 1M"}});
    cases.push_back({"refcount_bits_4", "refcount_bits=4", "8M", {"write -P 1 0 1M"}});
    cases.push_back({"refcount_bits_8", "refcount_bits=8", "8M", {"write -P 1 0 1M"}});
    cases.push_back({"refcount_bits_32", "refcount_bits=32", "8M", {"write -P 1 0 1M"}});
    cases.push_back({"refcount_bits_64", "refcount_bits=64", "8M", {"write -P 1 0 1M"}});
    cases.push_back({"snapshots", "", "16M", {"write -P 1 0 1M"}, [](const auto& image) {
                         snapshot(image, "-c s1");
                         io(image, "write -P 2 0 512k");
                         snapshot(image, "-c s2");
                     }});
    cases.push_back({"snapshot_deleted", "", "16M", {"write -P 1 0 1M"}, [](const auto& image) {
                         snapshot(image, "-c s1");
                         io(image, "write -P 2 0 2M");
                         snapshot(image, "-c s2");
                         snapshot(image, "-d s1");
                     }});
    cases.push_back({"snapshots_compressed",
                     "cluster_size=4k",
                     "4M",
                     {"write -c -P 1 0 64k"},
                     [](const auto& image) {
                         snapshot(image, "-c s1");
                         io(image, "write -P 2 0 8k");
                     }});
    cases.push_back(
        {"bitmaps", "", "16M", {"write -P 1 0 1M"}, [](const auto& image) {
             qt::run_ok("qemu-img bitmap --add " + qt::shell_quote(image.string()) + " b0");
             qt::run_ok("qemu-img bitmap --add -g 4096 " + qt::shell_quote(image.string()) + " b1");
             // Bitmaps get data clusters once the image is written through qemu.
             io(image, "write -P 3 0 4M");
         }});
    return cases;
}

class CheckClean : public testing::TestWithParam<std::size_t> {};

TEST_P(CheckClean, AgreesWithQemuImg) {
    const CleanCase c = clean_cases().at(GetParam());
    qt::TempDir dir;
    const auto image = dir / (std::string(c.name) + ".qcow2");
    std::string options = c.options;
    if (auto at = options.find("DIR"); at != std::string::npos) {
        options.replace(at, 3, dir.path().string());
    }
    qt::make_image(image, options, c.size, c.io);
    if (c.after)
        c.after(image);
    EXPECT_TRUE(agrees_with_qemu(image));
    auto result = check_image(image);
    ASSERT_TRUE(result) << result.error().message;
    EXPECT_EQ(result->corruptions, 0u);
    EXPECT_EQ(result->leaks, 0u);
    EXPECT_EQ(result->exit_code(), 0);
    EXPECT_TRUE(result->messages.empty());
}

INSTANTIATE_TEST_SUITE_P(Kinds, CheckClean, testing::Range<std::size_t>(0, clean_cases().size()),
                         [](const auto& info) { return clean_cases().at(info.param).name; });

TEST(CheckClean, CountsOfAKnownImage) {
    // 16 MiB, 64 KiB clusters, 1 MiB written at 0: 16 data clusters of 256, one L2 table.
    qt::TempDir dir;
    const auto image = dir / "known.qcow2";
    qt::make_image(image, "", "16M", {"write -P 1 0 1M"});
    auto r = check_image(image);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->total_clusters, 256u);
    EXPECT_EQ(r->allocated_clusters, 16u);
    EXPECT_EQ(r->fragmented_clusters, 0u);
    EXPECT_EQ(r->compressed_clusters, 0u);
    // header, refcount table, refcount block, L1, L2, 16 data clusters.
    EXPECT_EQ(r->image_end_offset, 21u * 65536);
}

TEST(CheckClean, EncryptedImageIsCheckedWithoutTheKey) {
    qt::TempDir dir;
    const auto image = dir / "luks.qcow2";
    qt::make_luks_image(image, "16M");
    qt::run_ok("qemu-io --object secret,id=s,data=PASS --image-opts -c 'write -P 1 0 1M' "
               "driver=qcow2,file.filename=" +
               image.string() + ",encrypt.key-secret=s >/dev/null");
    auto r = check_image(image);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->exit_code(), 0);
    // qemu-img needs the key to check it; its counts then match ours.
    auto q = qt::run("qemu-img check --output=json --object secret,id=s,data=PASS --image-opts "
                     "driver=qcow2,file.filename=" +
                     image.string() + ",encrypt.key-secret=s");
    ASSERT_EQ(q.exit_code, 0) << q.err;
    Counts qemu = parse_counts(q.out);
    EXPECT_EQ(qemu.at("image-end-offset"), r->image_end_offset);
    EXPECT_EQ(qemu.at("allocated-clusters"), r->allocated_clusters);
    EXPECT_EQ(qemu.at("total-clusters"), r->total_clusters);

    // Zero the refcount of the LUKS header area's first cluster: a corruption only if that
    // area is counted as referenced.
    Buffer b = qt::read_file(image);
    Geometry g(b);
    std::uint64_t luks_cluster = 0;
    for (std::uint64_t at = 104; at + 8 <= g.cluster_size; at += 8) {
        if (get_be(b, at, 4) == qcowmap::kExtensionEncryption) {
            luks_cluster = get_be(b, at + 8, 8) >> g.cluster_bits;
            break;
        }
    }
    ASSERT_NE(luks_cluster, 0u);
    g.set_refcount(b, luks_cluster, 0);
    qt::write_file(dir / "luks-damaged.qcow2", b);
    auto damaged = check_image(dir / "luks-damaged.qcow2");
    ASSERT_TRUE(damaged) << damaged.error().message;
    EXPECT_EQ(damaged->corruptions, 1u);
    EXPECT_EQ(damaged->exit_code(), 2);
}

// ---------------------------------------------------------------------------------------------
// Damaged images.

struct Damage {
    const char* name;
    const char* options;
    std::vector<std::string> io;
    std::function<void(Buffer&, const Geometry&)> patch;
    int exit_code;             ///< what both tools must exit with
    std::uint64_t corruptions; ///< what both must count
    std::uint64_t leaks;
};

std::uint64_t first_data(const Buffer& b, const Geometry& g) {
    return get_be(b, g.l2(b), 8) & kOffsetMask;
}

std::vector<Damage> damages() {
    const std::vector<std::string> data = {"write -P 1 0 1M"};
    return {
        {"refcount_bumped_on_data_cluster", "", data,
         [](Buffer& b, const Geometry& g) {
             const std::uint64_t c = first_data(b, g) >> g.cluster_bits;
             g.set_refcount(b, c, 2);
         },
         2, 1, 1}, // a leak, and COPIED set on a cluster whose refcount is not 1
        {"refcount_bumped_on_header", "", data,
         [](Buffer& b, const Geometry& g) { g.set_refcount(b, 0, 2); }, 3, 0, 1},
        {"refcount_set_on_free_cluster",
         "",
         {"write -P 1 0 1M", "discard 64k 64k"},
         [](Buffer& b, const Geometry& g) {
             // Discarding freed the data cluster of guest offset 64k: mark it used again.
             const std::uint64_t end = b.size() >> g.cluster_bits;
             for (std::uint64_t c = 1; c < end; ++c) {
                 if (g.refcount(b, c) == 0) {
                     g.set_refcount(b, c, 1);
                     return;
                 }
             }
             throw std::runtime_error("no free cluster");
         },
         3,
         0,
         1},
        {"refcount_zero_on_data_cluster", "", data,
         [](Buffer& b, const Geometry& g) {
             g.set_refcount(b, first_data(b, g) >> g.cluster_bits, 0);
         },
         2, 2, 0}, // refcount < references, and COPIED with refcount 0
        {"refcount_zero_on_l2_table", "", data,
         [](Buffer& b, const Geometry& g) { g.set_refcount(b, g.l2(b) >> g.cluster_bits, 0); }, 2,
         2, 0},
        {"refcount_zero_on_snapshot_data", "", data,
         [](Buffer& b, const Geometry& g) {
             g.set_refcount(b, first_data(b, g) >> g.cluster_bits, 1);
         },
         2, 2, 0}, // after a snapshot: refcount 1 (and COPIED clear) for a shared cluster
        {"refcount_bumped_8bit", "refcount_bits=8", data,
         [](Buffer& b, const Geometry& g) {
             g.set_refcount(b, first_data(b, g) >> g.cluster_bits, 5);
         },
         2, 1, 1},
        {"refcount_zero_64bit", "refcount_bits=64", data,
         [](Buffer& b, const Geometry& g) {
             g.set_refcount(b, first_data(b, g) >> g.cluster_bits, 0);
         },
         2, 2, 0},
        {"refcount_zero_32bit", "refcount_bits=32", data,
         [](Buffer& b, const Geometry& g) {
             g.set_refcount(b, first_data(b, g) >> g.cluster_bits, 0);
         },
         2, 2, 0},
        {"l2_entry_unaligned", "", data,
         [](Buffer& b, const Geometry& g) { put_be(b, g.l2(b), get_be(b, g.l2(b), 8) + 512, 8); },
         2, 2, 0},
        {"l2_entry_reserved_bits", "", data,
         [](Buffer& b, const Geometry& g) { put_be(b, g.l2(b), get_be(b, g.l2(b), 8) | 2, 8); }, 2,
         1, 0},
        {"l1_entry_reserved_bits", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.l1_offset, get_be(b, g.l1_offset, 8) | 1, 8);
         },
         2, 1, 0},
        // Found by a mutation loop over check -r all: qemu walks an L1 entry with COPIED set
        // and no offset as an L2 table at offset 0 (the header); we skipped it.
        {"l1_entry_copied_flag_without_offset", "cluster_size=512", data,
         [](Buffer& b, const Geometry& g) { put_be(b, g.l1_offset + 8 * 20, 1ULL << 63, 8); }, 2, 9,
         65}, // the header's bytes read as L2 entries
        {"l2_entry_past_end_of_file", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.l2(b) + 8, (1ULL << 63) | (1ULL << 40), 8);
         },
         2, 2, 1},
        {"two_l2_entries_share_a_cluster", "", data,
         [](Buffer& b, const Geometry& g) { put_be(b, g.l2(b) + 8, get_be(b, g.l2(b), 8), 8); }, 2,
         1, 1},
        {"copied_flag_cleared", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.l2(b), get_be(b, g.l2(b), 8) & ~(1ULL << 63), 8);
         },
         2, 1, 0},
        {"compressed_with_copied_flag",
         "cluster_size=64k",
         {"write -c -P 1 0 64k"},
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.l2(b), get_be(b, g.l2(b), 8) | (1ULL << 63), 8);
         },
         2,
         1,
         0},
        {"refcount_table_entry_unaligned", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.refcount_table_offset, get_be(b, g.refcount_table_offset, 8) + 512, 8);
         },
         1, 1, 0}, // every refcount of the block is unreadable: check errors
        {"refcount_table_entry_reserved_bits", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.refcount_table_offset, get_be(b, g.refcount_table_offset, 8) | 1, 8);
         },
         2, 1, 1},
        {"refcount_block_listed_twice", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.refcount_table_offset + 8, get_be(b, g.refcount_table_offset, 8), 8);
         },
         2, 2, 0},
        {"refcount_block_outside_image", "", data,
         [](Buffer& b, const Geometry& g) {
             put_be(b, g.refcount_table_offset + 8, 1ULL << 40, 8);
         },
         2, 1, 0},
    };
}

class CheckDamaged : public testing::TestWithParam<std::size_t> {};

TEST_P(CheckDamaged, AgreesWithQemuImg) {
    const Damage d = damages().at(GetParam());
    qt::TempDir dir;
    const auto healthy = dir / "healthy.qcow2";
    qt::make_image(healthy, d.options, "16M", d.io);
    if (std::string(d.name) == "refcount_zero_on_snapshot_data")
        snapshot(healthy, "-c s1");
    ASSERT_TRUE(agrees_with_qemu(healthy));
    Buffer b = qt::read_file(healthy);
    d.patch(b, Geometry(b));
    const auto image = dir / (std::string(d.name) + ".qcow2");
    qt::write_file(image, b);
    EXPECT_TRUE(agrees_with_qemu(image));
    auto r = check_image(image);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->exit_code(), d.exit_code);
    EXPECT_EQ(r->corruptions, d.corruptions);
    EXPECT_EQ(r->leaks, d.leaks);
    EXPECT_FALSE(r->messages.empty());
}

INSTANTIATE_TEST_SUITE_P(Kinds, CheckDamaged, testing::Range<std::size_t>(0, damages().size()),
                         [](const auto& info) { return damages().at(info.param).name; });

// ---------------------------------------------------------------------------------------------
// The CLI.

TEST(CheckCli, HumanOutputAndMessages) {
    qt::TempDir dir;
    const auto image = dir / "img.qcow2";
    qt::make_image(image, "", "16M", {"write -P 1 0 1M"});
    auto clean = qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote(image.string()));
    EXPECT_EQ(clean.exit_code, 0);
    EXPECT_EQ(clean.err, "");
    EXPECT_EQ(clean.out, "No errors were found on the image.\n16/256 = 6.25% allocated, 0.00% "
                         "fragmented, 0.00% compressed clusters\nImage end offset: 1376256\n");
    // Identical to qemu-img's human output.
    EXPECT_EQ(clean.out, qt::run_ok("qemu-img check " + qt::shell_quote(image.string())));

    Buffer b = qt::read_file(image);
    Geometry g(b);
    g.set_refcount(b, 0, 2);
    qt::write_file(image, b);
    auto leaked = qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote(image.string()));
    EXPECT_EQ(leaked.exit_code, 3);
    EXPECT_EQ(leaked.err, "Leaked cluster 0 refcount=2 reference=1\n");
    EXPECT_NE(leaked.out.find("1 leaked clusters were found on the image."), std::string::npos);
}

TEST(CheckCli, JsonHasEveryCount) {
    qt::TempDir dir;
    const auto image = dir / "img.qcow2";
    qt::make_image(image, "cluster_size=4k", "1M", {"write -c -P 1 0 8k"});
    for (const char* flag : {"--json", "--output=json"}) {
        auto r =
            qt::run(qt::qcowmap_bin() + " check " + flag + " " + qt::shell_quote(image.string()));
        EXPECT_EQ(r.exit_code, 0) << r.err;
        for (const auto& key : kKeys) {
            EXPECT_NE(r.out.find("\"" + key + "\": "), std::string::npos) << key;
        }
        EXPECT_NE(r.out.find("\"compressed-clusters\": 2"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("\"format\": \"qcow2\""), std::string::npos);
    }
}

TEST(CheckCli, CannotCheckIsOneLineAndExit1) {
    qt::TempDir dir;
    qt::write_file(dir / "junk", Buffer(4096, std::byte{0x42}));
    // Said to be qcow2, it is not: one line, exit 1, and what to do.
    auto junk =
        qt::run(qt::qcowmap_bin() + " check -f qcow2 " + qt::shell_quote((dir / "junk").string()));
    EXPECT_EQ(junk.exit_code, 1);
    EXPECT_EQ(junk.out, "");
    EXPECT_NE(junk.err.find("bad magic"), std::string::npos) << junk.err;
    EXPECT_NE(junk.err.find("(use -f raw for a raw image)"), std::string::npos) << junk.err;
    EXPECT_EQ(std::count(junk.err.begin(), junk.err.end(), '\n'), 1);
    // Probed (issue 25), it is raw, and qemu-img check's answer for raw is 63.
    auto probed = qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote((dir / "junk").string()));
    EXPECT_EQ(probed.exit_code, 63);
    EXPECT_NE(probed.err.find("This image format does not support checks"), std::string::npos)
        << probed.err;
    EXPECT_EQ(qt::run("qemu-img check " + qt::shell_quote((dir / "junk").string())).exit_code, 63);

    auto missing =
        qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote((dir / "missing").string()));
    EXPECT_EQ(missing.exit_code, 1);
    EXPECT_EQ(std::count(missing.err.begin(), missing.err.end(), '\n'), 1);

    const auto v1 = dir / "v1.qcow";
    qt::run_ok("qemu-img create -q -f qcow " + qt::shell_quote(v1.string()) + " 1M");
    auto old = qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote(v1.string()));
    EXPECT_EQ(old.exit_code, 1);
    EXPECT_NE(old.err.find("qcow version 1"), std::string::npos) << old.err;

    auto usage = qt::run(qt::qcowmap_bin() + " check");
    EXPECT_EQ(usage.exit_code, 1);
}

TEST(CheckCli, DoesNotModifyTheImage) {
    qt::TempDir dir;
    const auto image = dir / "img.qcow2";
    qt::make_image(image, "", "16M", {"write -P 1 0 1M"});
    Buffer b = qt::read_file(image);
    Geometry(b).set_refcount(b, 0, 0); // a corruption qemu-img check -r would repair
    qt::write_file(image, b);
    auto r = qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote(image.string()));
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_EQ(qt::read_file(image), b);
}

TEST(CheckLibrary, MessagesAreCapped) {
    qt::TempDir dir;
    const auto image = dir / "img.qcow2";
    qt::make_image(image, "cluster_size=4k", "4M", {"write -P 1 0 1M"});
    Buffer b = qt::read_file(image);
    Geometry g(b);
    // Zero the refcounts of every data cluster: 256 corruptions plus their COPIED errors.
    for (unsigned i = 0; i < 256; ++i) {
        g.set_refcount(b, (get_be(b, g.l2(b) + 8 * i, 8) & kOffsetMask) >> g.cluster_bits, 0);
    }
    CheckOptions options;
    options.max_messages = 10;
    auto r = check_image(std::span<const std::byte>(b), options);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->corruptions, 512u);
    EXPECT_EQ(r->messages.size(), 10u);
    EXPECT_EQ(r->messages_dropped, 502u);
}

TEST(CheckLibrary, MemoryIsBoundedByTheFileNotTheHeader) {
    // A 4 KiB-cluster image claiming an exabyte-scale disk (L1 at qemu's 32 MiB cap would be
    // refused at parse): the checker's table is sized by the 20-odd clusters of the file.
    qt::TempDir dir;
    const auto image = dir / "img.qcow2";
    qt::make_image(image, "cluster_size=4k", "1M", {"write -P 1 0 8k"});
    Buffer b = qt::read_file(image);
    // Point 4 L2 entries far past the end: counted as corruptions, never allocated for.
    Geometry g(b);
    for (unsigned i = 4; i < 8; ++i)
        put_be(b, g.l2(b) + 8 * i, (1ULL << 63) | (1ULL << 54), 8);
    auto r = check_image(std::span<const std::byte>(b));
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_GE(r->corruptions, 4u);
    EXPECT_EQ(r->image_end_offset, (b.size() + 4095) / 4096 * 4096);
}

// ---------------------------------------------------------------------------------------------
// Bitmap table offsets (the directory itself is validated at open).

TEST(CheckBitmaps, BitmapTableOffsets) {
    qt::TempDir dir;
    const auto healthy = dir / "bitmaps.qcow2";
    qt::make_image(healthy, "", "16M", {"write -P 1 0 1M"});
    qt::run_ok("qemu-img bitmap --add " + qt::shell_quote(healthy.string()) + " b0");
    io(healthy, "write -P 2 0 4M"); // gives the bitmap a table and a data cluster
    const Buffer b = qt::read_file(healthy);
    // Bitmaps extension (spec "Bitmaps extension"): directory offset at data + 16.
    std::uint64_t at = get_be(b, 100, 4);
    while (get_be(b, at, 4) != qcowmap::kExtensionBitmaps) {
        ASSERT_NE(get_be(b, at, 4), 0u) << "no bitmaps extension";
        at += 8 + ((get_be(b, at + 4, 4) + 7) & ~std::uint64_t{7});
    }
    const std::uint64_t directory = get_be(b, at + 8 + 16, 8);
    const std::uint64_t table = get_be(b, directory, 8);
    ASSERT_NE(table, 0u);
    ASSERT_TRUE(agrees_with_qemu(healthy));

    struct Case {
        const char* name;
        std::uint64_t offset;
        const char* message;
        bool qemu_opens; ///< qemu-img refuses the unaligned and header-overlapping tables
        const char* open_error = ""; ///< our open error when qemu refuses the image
    };
    for (const Case& c :
         {Case{"past-eof", 1ULL << 40, "bitmap table at 0x10000000000", true},
          Case{"unaligned", table + 512, "", false,
               "is not a non-zero multiple of the cluster size"},
          Case{"over-header", 0, "", false, "is not a non-zero multiple of the cluster size"}}) {
        Buffer damaged = b;
        put_be(damaged, directory, c.offset, 8);
        const auto image = dir / (std::string(c.name) + ".qcow2");
        qt::write_file(image, damaged);
        auto r = check_image(image);
        if (!c.qemu_opens) {
            // Open refuses these, as qemu does: nothing to check (qemu-img check exits 1 too).
            ASSERT_FALSE(r) << c.name;
            EXPECT_NE(r.error().message.find(c.open_error), std::string::npos)
                << c.name << ": " << r.error().message;
            EXPECT_EQ(qemu_check(image).exit_code, 1) << c.name;
            qt::CommandResult ours =
                qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote(image.string()));
            EXPECT_EQ(ours.exit_code, 1) << c.name;
            continue;
        }
        ASSERT_TRUE(r) << c.name << ": " << r.error().message;
        EXPECT_EQ(r->exit_code(), 2) << c.name;
        EXPECT_GE(r->corruptions, 1u) << c.name;
        std::string all;
        for (const auto& line : r->messages)
            all += line + "\n";
        EXPECT_NE(all.find(c.message), std::string::npos) << c.name << ":\n" << all;
        EXPECT_TRUE(agrees_with_qemu(image));
    }
}

// Autoclear bit 0 clear (a writer that does not know bitmaps touched the image): qemu ignores the
// stale extension, so the directory, table and data clusters it used are leaks.
TEST(CheckBitmaps, StaleExtensionClustersAreLeaks) {
    qt::TempDir dir;
    const auto image = dir / "stale.qcow2";
    qt::make_image(image, "", "16M", {"write -P 1 0 1M"});
    qt::run_ok("qemu-img bitmap --add " + qt::shell_quote(image.string()) + " b0");
    io(image, "write -P 2 0 4M"); // gives the bitmap a table and a data cluster
    Buffer b = qt::read_file(image);
    ASSERT_EQ(get_be(b, 88, 8) & 1, 1u) << "qemu sets autoclear bit 0";
    put_be(b, 88, get_be(b, 88, 8) & ~std::uint64_t{1}, 8);
    qt::write_file(image, b);
    const Report qemu = qemu_check(image);
    EXPECT_EQ(qemu.exit_code, 3) << qemu.err;
    EXPECT_TRUE(agrees_with_qemu(image));
    auto r = check_image(image);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->corruptions, 0u);
    EXPECT_GE(r->leaks, 3u); // directory, table, data cluster
}

// Every L1 entry pointing at one L2 table: qemu-img check rescans that table once per entry
// (2^40 visits for a 36 MiB file with 2 MiB clusters). Our check stops once the visits exceed
// what any real image of that size could need, and says it could not check (exit 1).
TEST(CheckLimits, SharedL2TableDoesNotSpin) {
    qt::TempDir dir;
    const auto image = dir / "shared-l2.qcow2";
    qt::make_image(image, "", "4T", {"write -P 1 0 64k"});
    Buffer b = qt::read_file(image);
    const std::uint64_t l1_size = get_be(b, 36, 4);
    const std::uint64_t l1_offset = get_be(b, 40, 8);
    ASSERT_EQ(l1_size, 8192u) << "4 TiB at 64 KiB clusters";
    const std::uint64_t first = get_be(b, l1_offset, 8);
    ASSERT_NE(first, 0u) << "the write allocated an L2 table";
    for (std::uint64_t i = 1; i < l1_size; ++i) {
        put_be(b, l1_offset + i * 8, first, 8);
    }
    qt::write_file(image, b);
    auto r = check_image(image);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->exit_code(), 1);
    EXPECT_EQ(r->check_errors, 1u);
    std::string all;
    for (const auto& line : r->messages)
        all += line + "\n";
    EXPECT_NE(all.find("check stopped"), std::string::npos) << all;
    qt::CommandResult cli =
        qt::run(qt::qcowmap_bin() + " check " + qt::shell_quote(image.string()));
    EXPECT_EQ(cli.exit_code, 1) << cli.err;
}

} // namespace
