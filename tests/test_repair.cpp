// `qcowmap check -r leaks|all` (repair_image) against `qemu-img check -r` on two copies of the
// same damaged image: same exit status, same counts repaired, our result clean by qemu-img
// check and equal by qemu-img compare. The damage is made with real qemu (writes, internal
// snapshots, a qemu-io killed with lazy refcounts, as qemu-iotests 039 does) and refcount
// entries edited in place.
#include "support.hpp"
#include "writable_io.hpp"

#include <qcowmap/check.hpp>
#include <qcowmap/writable.hpp>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <unistd.h>

namespace qcowmap::test {
namespace {

namespace fs = std::filesystem;

constexpr std::uint64_t kCluster = 65536;

/// The file offset of the 16-bit refcount entry of `cluster` (block 0 of the refcount table;
/// the test images are small enough for one block).
std::uint64_t refcount_entry_at(const fs::path& image, std::uint64_t cluster) {
    const std::uint64_t reftable = peek_be(image, 48, 8);
    const std::uint64_t block = peek_be(image, reftable, 8) & ~std::uint64_t{0x1ff};
    return block + cluster * 2;
}

void set_refcount(const fs::path& image, std::uint64_t cluster, std::uint64_t value) {
    poke_be(image, refcount_entry_at(image, cluster), value, 2);
}

/// The host cluster of the first active L2 table's first entry.
std::uint64_t first_data_cluster(const fs::path& image) {
    const std::uint64_t l1 = peek_be(image, 40, 8);
    const std::uint64_t l2 = peek_be(image, l1, 8) & 0x00fffffffffffe00ULL;
    return (peek_be(image, l2, 8) & 0x00fffffffffffe00ULL) / kCluster;
}

std::uint64_t file_clusters(const fs::path& image) {
    return fs::file_size(image) / kCluster;
}

/// Appends `count` clusters to the file, each with refcount 1 and referenced by nothing.
void leak_new_clusters(const fs::path& image, std::uint64_t count) {
    const std::uint64_t first = file_clusters(image);
    fs::resize_file(image, (first + count) * kCluster);
    for (std::uint64_t c = first; c < first + count; ++c)
        set_refcount(image, c, 1);
}

/// A JSON counter of qemu-img check's output; qemu leaves zero counters out.
std::uint64_t json_count(const std::string& json, const std::string& key) {
    std::smatch m;
    const std::regex re("\"" + key + "\": ([0-9]+)");
    return std::regex_search(json, m, re) ? std::stoull(m[1]) : 0;
}

struct Outcome {
    int ours = -1;
    int theirs = -1;
    std::string ours_json;
    std::string theirs_json;
    std::string ours_err;
    std::string theirs_err;
};

/// Copies `image` twice and repairs one copy with qcowmap, the other with qemu-img.
Outcome repair_both(const TempDir& dir, const fs::path& image, const std::string& mode) {
    fs::copy_file(image, dir / "ours.qcow2", fs::copy_options::overwrite_existing);
    fs::copy_file(image, dir / "theirs.qcow2", fs::copy_options::overwrite_existing);
    Outcome o;
    CommandResult ours = run("timeout -k 5 120 " + cli() + " check -r " + mode + " --output=json " +
                             q(dir / "ours.qcow2"));
    CommandResult theirs = run("timeout -k 5 120 qemu-img check -r " + mode + " --output=json " +
                               q(dir / "theirs.qcow2"));
    o.ours = ours.exit_code;
    o.theirs = theirs.exit_code;
    o.ours_json = ours.out;
    o.theirs_json = theirs.out;
    o.ours_err = ours.err;
    o.theirs_err = theirs.err;
    return o;
}

void expect_same_counts(const Outcome& o) {
    EXPECT_EQ(o.ours, o.theirs) << o.ours_json << "\nqemu-img:\n" << o.theirs_json;
    for (const char* key : {"leaks-fixed", "corruptions-fixed", "leaks", "corruptions"}) {
        EXPECT_EQ(json_count(o.ours_json, key), json_count(o.theirs_json, key))
            << key << "\n"
            << o.ours_json << "\nqemu-img:\n"
            << o.theirs_json;
    }
}

void expect_clean_and_equal(const TempDir& dir, const fs::path& original) {
    CommandResult check = run("qemu-img check " + q(dir / "ours.qcow2"));
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
    CommandResult compare =
        run("qemu-img compare -U " + q(dir / "ours.qcow2") + " " + q(dir / "theirs.qcow2"));
    EXPECT_EQ(compare.exit_code, 0) << compare.out << compare.err;
    if (!original.empty()) {
        CommandResult same =
            run("qemu-img compare -U " + q(dir / "ours.qcow2") + " " + q(original));
        EXPECT_EQ(same.exit_code, 0) << same.out << same.err;
    }
}

/// A 64 MiB image with data in its first 256 KiB, three leaked clusters: two past the data,
/// referenced by nothing, and the first data cluster with refcount 2 for one reference (its
/// COPIED flag then disagrees too, until the leak is repaired).
fs::path leaky_image(const TempDir& dir) {
    const fs::path image = dir / "leaky.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 0x5a 0 256k"});
    leak_new_clusters(image, 2);
    set_refcount(image, first_data_cluster(image), 2);
    return image;
}

/// An image with an internal snapshot whose shared data cluster has refcount 1 for two
/// references (a corruption qemu repairs in place with -r all), and one leaked cluster.
fs::path undercounted_image(const TempDir& dir) {
    const fs::path image = dir / "under.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 0x11 0 128k"});
    run_ok("qemu-img snapshot -c snap " + q(image));
    run_ok("qemu-io -f qcow2 -c 'write -P 0x22 64k 64k' " + q(image) + " >/dev/null");
    set_refcount(image, first_data_cluster(image), 1);
    leak_new_clusters(image, 1);
    return image;
}

/// An image qemu-io was killed while writing with lazy refcounts: the dirty bit is set and the
/// new clusters have refcount 0 (qemu-iotests 039).
fs::path dirty_image(const TempDir& dir) {
    const fs::path image = dir / "dirty.qcow2";
    run_ok("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + q(image) + " 64M");
    run("qemu-io -f qcow2 -c 'write -P 0x33 0 1M' -c 'write -P 0x44 4M 128k' -c 'sigraise 9' " +
        q(image) + " >/dev/null 2>&1");
    EXPECT_EQ(peek_be(image, 72, 8) & 1, 1u) << "qemu-io left no dirty bit";
    return image;
}

TEST(Repair, LeaksAsQemuImg) {
    TempDir dir;
    const fs::path image = leaky_image(dir);
    EXPECT_EQ(run("qemu-img check " + q(image)).exit_code, 2); // a COPIED mismatch, 3 leaks
    Outcome o = repair_both(dir, image, "leaks");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0);
    EXPECT_EQ(json_count(o.ours_json, "leaks-fixed"), 3u) << o.ours_json;
    EXPECT_EQ(o.ours_err, o.theirs_err); // the same lines, in the same order
    expect_clean_and_equal(dir, image);
}

TEST(Repair, LeaksWithOtherRefcountWidthsAsQemuImg) {
    for (unsigned bits : {1u, 8u, 64u}) {
        SCOPED_TRACE(fmt::format("refcount_bits={}", bits));
        TempDir dir;
        const fs::path image = dir / "w.qcow2";
        make_image(image, fmt::format("cluster_size=64k,refcount_bits={}", bits), "64M",
                   {"write -P 3 0 128k"});
        const std::uint64_t leaked = file_clusters(image);
        fs::resize_file(image, (leaked + 1) * kCluster);
        const std::uint64_t reftable = peek_be(image, 48, 8);
        const std::uint64_t block = peek_be(image, reftable, 8) & ~std::uint64_t{0x1ff};
        if (bits == 1) {
            // qemu's get_refcount_ro0: bit (index % 8) of byte index / 8, least significant
            // first.
            const std::uint64_t at = block + leaked / 8;
            poke_be(image, at, peek_be(image, at, 1) | (1u << (leaked % 8)), 1);
        } else {
            poke_be(image, block + leaked * (bits / 8), 1, bits / 8);
        }
        ASSERT_EQ(run("qemu-img check " + q(image)).exit_code, 3);
        Outcome o = repair_both(dir, image, "leaks");
        expect_same_counts(o);
        EXPECT_EQ(o.ours, 0) << o.ours_json;
        EXPECT_EQ(json_count(o.ours_json, "leaks-fixed"), 1u) << o.ours_json;
        EXPECT_EQ(o.ours_err, o.theirs_err);
        expect_clean_and_equal(dir, image);
    }
}

TEST(Repair, CorruptBitClearedAsQemuImg) {
    TempDir dir;
    const fs::path image = dir / "flagged.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 1 0 128k"});
    leak_new_clusters(image, 1);
    poke_be(image, 72, peek_be(image, 72, 8) | 2, 8); // incompatible bit 1: corrupt
    Outcome o = repair_both(dir, image, "leaks");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0) << o.ours_json;
    EXPECT_EQ(peek_be(dir / "ours.qcow2", 72, 8), peek_be(dir / "theirs.qcow2", 72, 8));
    EXPECT_EQ(peek_be(dir / "ours.qcow2", 72, 8) & 2, 0u);
    expect_clean_and_equal(dir, {});
}

TEST(Repair, HumanOutputWordedAsQemuImg) {
    TempDir dir;
    const fs::path image = leaky_image(dir);
    const std::uint64_t leaked = file_clusters(image) - 2;
    CommandResult r = run(cli() + " check -r leaks " + q(image));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.err.find("Repairing cluster " + std::to_string(leaked) + " refcount=1 reference=0"),
              std::string::npos)
        << r.err;
    EXPECT_NE(r.out.find("The following inconsistencies were found and repaired:\n\n"
                         "    3 leaked clusters\n    0 corruptions\n\n"
                         "Double checking the fixed image now...\n"
                         "No errors were found on the image.\n"),
              std::string::npos)
        << r.out;
}

TEST(Repair, AllRaisesUndercountedRefcountAsQemuImg) {
    TempDir dir;
    const fs::path image = undercounted_image(dir);
    EXPECT_EQ(run("qemu-img check " + q(image)).exit_code, 2);
    Outcome o = repair_both(dir, image, "all");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0);
    EXPECT_EQ(json_count(o.ours_json, "corruptions-fixed"), 1u) << o.ours_json;
    EXPECT_EQ(json_count(o.ours_json, "leaks-fixed"), 1u) << o.ours_json;
    EXPECT_EQ(o.ours_err, o.theirs_err);
    expect_clean_and_equal(dir, image);
    // The snapshot still reads as it was taken.
    run_ok("qemu-img snapshot -a snap " + q(dir / "ours.qcow2"));
    run_ok("qemu-io -f qcow2 -c 'read -P 0x11 0 128k' " + q(dir / "ours.qcow2") + " >/dev/null");
}

TEST(Repair, LeaksLeavesCorruptionAsQemuImg) {
    TempDir dir;
    const fs::path image = undercounted_image(dir);
    const std::uint64_t data = first_data_cluster(image);
    Outcome o = repair_both(dir, image, "leaks");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 2) << o.ours_json;
    EXPECT_EQ(json_count(o.ours_json, "leaks-fixed"), 1u) << o.ours_json;
    EXPECT_EQ(o.ours_err, o.theirs_err);
    // The undercounted refcount is untouched; qemu-img still sees the corruption.
    EXPECT_EQ(peek_be(dir / "ours.qcow2", refcount_entry_at(dir / "ours.qcow2", data), 2), 1u);
    EXPECT_EQ(run("qemu-img check " + q(dir / "ours.qcow2")).exit_code, 2);
}

TEST(Repair, DirtyLazyRefcountImageAsQemuImg) {
    TempDir dir;
    const fs::path image = dirty_image(dir);
    Outcome o = repair_both(dir, image, "all");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0) << o.ours_json;
    EXPECT_GT(json_count(o.ours_json, "corruptions-fixed"), 0u) << o.ours_json;
    EXPECT_EQ(peek_be(dir / "ours.qcow2", 72, 8) & 1, 0u) << "dirty bit still set";
    expect_clean_and_equal(dir, {});
    run_ok("qemu-io -f qcow2 -c 'read -P 0x33 0 1M' -c 'read -P 0x44 4M 128k' " +
           q(dir / "ours.qcow2") + " >/dev/null");
}

TEST(Repair, MissingRefcountBlockAllocatedAsQemuImg) {
    // 512-byte clusters with 64-bit refcounts: one refcount block counts 64 clusters, so 64 KiB
    // of data spans three blocks. The refcount table entry of the second is cleared: its 63
    // referenced clusters have no refcount (qemu-img check -r all rebuilds the refcount
    // structure; we allocate the missing block).
    TempDir dir;
    const fs::path image = dir / "noblock.qcow2";
    make_image(image, "cluster_size=512,refcount_bits=64", "1M", {"write -P 7 0 64k"});
    const std::uint64_t reftable = peek_be(image, 48, 8);
    ASSERT_NE(peek_be(image, reftable + 8, 8), 0u);
    poke_be(image, reftable + 8, 0, 8);
    EXPECT_EQ(run("qemu-img check " + q(image)).exit_code, 2);
    Outcome o = repair_both(dir, image, "all");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0) << o.ours_json;
    EXPECT_EQ(json_count(o.ours_json, "corruptions-fixed"), 63u) << o.ours_json;
    EXPECT_NE(peek_be(dir / "ours.qcow2", peek_be(dir / "ours.qcow2", 48, 8) + 8, 8), 0u);
    expect_clean_and_equal(dir, {});
    run_ok("qemu-io -f qcow2 -c 'read -P 7 0 64k' " + q(dir / "ours.qcow2") + " >/dev/null");
}

/// The clusters check_image finds with a refcount below their references ("ERROR cluster N
/// refcount=R reference=F").
std::set<std::uint64_t> undercounted_clusters(const fs::path& image) {
    CheckOptions options;
    options.max_messages = 1u << 20;
    auto r = check_image(image, options);
    EXPECT_TRUE(r) << r.error().message;
    std::set<std::uint64_t> clusters;
    if (!r)
        return clusters;
    const std::regex line("^ERROR cluster ([0-9]+) refcount=");
    for (const std::string& m : r->messages) {
        std::smatch found;
        if (std::regex_search(m, found, line))
            clusters.insert(std::stoull(found[1]));
    }
    return clusters;
}

/// Stops repair_image at each of its writes, syncs and size changes in turn (as a killed
/// process, then as a power cut losing unsynced writes): whatever it leaves must have no
/// refcount lower than the references that was not so before (no cluster undercounted that
/// was not, no more corruptions in all than the image had), and a second repair must finish
/// the job.
void crash_at_every_step(const fs::path& image, RepairMode mode) {
    auto before = check_image(image);
    ASSERT_TRUE(before) << before.error().message;
    const std::uint64_t corruptions = before->corruptions;
    TempDir dir;
    const fs::path work = dir / "work.qcow2";
    fs::copy_file(image, work);
    std::set<std::uint64_t> undercounted_before = undercounted_clusters(image);
    // A refcount block the table names past the end of the file comes inside it once a
    // rebuild grows the file beyond it (as qemu's own repair grows the file to reach it):
    // until the header switches, that block (all zeros) counts as referenced with refcount 0.
    const std::uint64_t cluster_size = std::uint64_t{1} << peek_be(image, 20, 4);
    const std::uint64_t reftable = peek_be(image, 48, 8);
    const std::uint64_t entries = peek_be(image, 56, 4) * cluster_size / 8;
    for (std::uint64_t i = 0; i < entries && reftable + i * 8 + 8 <= fs::file_size(image); ++i) {
        const std::uint64_t block = peek_be(image, reftable + i * 8, 8) & ~std::uint64_t{511};
        if (block >= fs::file_size(image))
            undercounted_before.insert(block / cluster_size);
    }
    detail::arm_fault(UINT64_MAX);
    auto full = repair_image(work, RepairOptions{mode});
    const std::uint64_t total = detail::disarm_fault();
    ASSERT_TRUE(full) << full.error().message;
    ASSERT_EQ(full->exit_code(), 0);
    ASSERT_GT(total, 2u);
    for (auto fault : {detail::FaultMode::stop, detail::FaultMode::lose_unsynced}) {
        for (std::uint64_t n = 1; n <= total; ++n) {
            SCOPED_TRACE(fmt::format("fault at operation {} of {}, mode {}", n, total,
                                     fault == detail::FaultMode::stop ? "stop" : "power cut"));
            fs::copy_file(image, work, fs::copy_options::overwrite_existing);
            detail::arm_fault(n, fault, n);
            auto crashed = repair_image(work, RepairOptions{mode});
            EXPECT_TRUE(detail::fault_fired());
            detail::disarm_fault();
            EXPECT_FALSE(crashed);
            auto left = check_image(work);
            ASSERT_TRUE(left) << left.error().message;
            EXPECT_LE(left->corruptions, corruptions);
            for (std::uint64_t cluster : undercounted_clusters(work)) {
                EXPECT_TRUE(undercounted_before.count(cluster))
                    << "cluster " << cluster << " undercounted after the crash, not before";
            }
            CommandResult qemu = run("qemu-img check " + q(work));
            if (corruptions == 0) {
                EXPECT_TRUE(qemu.exit_code == 0 || qemu.exit_code == 3) << qemu.out << qemu.err;
            }
            auto again = repair_image(work, RepairOptions{mode});
            ASSERT_TRUE(again) << again.error().message;
            EXPECT_EQ(again->exit_code(), 0);
            EXPECT_EQ(run("qemu-img check " + q(work)).exit_code, 0);
        }
    }
}

TEST(Repair, CrashDuringLeakRepairLeavesOnlyLeaks) {
    TempDir dir;
    const fs::path image = dir / "leaks.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 0x5a 0 256k"});
    leak_new_clusters(image, 3);
    auto before = check_image(image);
    ASSERT_TRUE(before);
    ASSERT_EQ(before->corruptions, 0u);
    crash_at_every_step(image, RepairMode::leaks);
}

TEST(Repair, CrashDuringFullRepairAddsNoCorruption) {
    TempDir dir;
    const fs::path image = dirty_image(dir);
    auto before = check_image(image);
    ASSERT_TRUE(before);
    ASSERT_GT(before->corruptions, 0u);
    crash_at_every_step(image, RepairMode::all);
}

TEST(Repair, CrashWhileAllocatingARefcountBlockAddsNoCorruption) {
    TempDir dir;
    const fs::path image = dir / "noblock.qcow2";
    make_image(image, "cluster_size=512,refcount_bits=64", "1M", {"write -P 7 0 64k"});
    const std::uint64_t reftable = peek_be(image, 48, 8);
    poke_be(image, reftable + 8, 0, 8);
    auto before = check_image(image);
    ASSERT_TRUE(before);
    ASSERT_GT(before->corruptions, 0u);
    crash_at_every_step(image, RepairMode::all);
}

// ---------------------------------------------------------------------------------------------
// Rebuilding the refcount structure (qemu's rebuild_refcount_structure, qemu-iotests 060/108)

/// A 64 MiB image with 64 KiB of data, as qemu-iotests 108 starts; `original` keeps a copy.
fs::path small_image(const TempDir& dir, const std::string& name, fs::path& original) {
    const fs::path image = dir / name;
    make_image(image, "cluster_size=64k", "64M", {"write -P 42 0 64k"});
    original = dir / ("original-" + name);
    fs::copy_file(image, original);
    return image;
}

/// qemu-img check -r all rebuilds the refcount structure of `damaged`; so do we: the same exit
/// status and counts, "Rebuilding refcount structure" said, our result clean, equal to
/// qemu-img's and to `original` (the image before the damage).
void expect_rebuilt_as_qemu_img(const TempDir& dir, const fs::path& damaged,
                                const fs::path& original) {
    Outcome o = repair_both(dir, damaged, "all");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
    EXPECT_NE(o.theirs_err.find("Rebuilding refcount structure"), std::string::npos)
        << o.theirs_err;
    EXPECT_NE(o.ours_err.find("Rebuilding refcount structure"), std::string::npos) << o.ours_err;
    expect_clean_and_equal(dir, original);
}

TEST(Repair, RebuildsAnImageWithoutRefcountTableAsQemuImg) {
    // qemu-iotests 108: the header names no refcount table at all.
    TempDir dir;
    fs::path original;
    const fs::path image = small_image(dir, "notable.qcow2", original);
    poke_be(image, 48, 0, 8);
    poke_be(image, 56, 0, 4);
    expect_rebuilt_as_qemu_img(dir, image, original);
    // The library says what it did; the header names the new table.
    fs::copy_file(image, dir / "library.qcow2");
    auto r = repair_image(dir / "library.qcow2", RepairOptions{RepairMode::all});
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_TRUE(r->refcounts_rebuilt);
    EXPECT_EQ(r->corruptions_fixed, 4u); // header, L1, L2 and data cluster: refcount 0
    EXPECT_EQ(r->exit_code(), 0);
    EXPECT_TRUE(r->double_checked);
    EXPECT_NE(peek_be(dir / "library.qcow2", 48, 8), 0u);
    EXPECT_NE(peek_be(dir / "library.qcow2", 56, 4), 0u);
    // With -r leaks both fail as qemu-img does ("need to rebuild refcount structures").
    Outcome leaks = repair_both(dir, image, "leaks");
    EXPECT_EQ(leaks.ours, 1);
    EXPECT_EQ(leaks.theirs, 1);
}

TEST(Repair, RebuildsARefcountBlockSharedWithDataAsQemuImg) {
    // qemu-iotests 060: an L2 entry points at the refcount block, so that cluster has two
    // references (qemu: "ERROR refcount block 0 refcount=2", rebuild).
    TempDir dir;
    const fs::path image = dir / "shared.qcow2";
    run_ok("qemu-img create -q -f qcow2 -o compat=1.1 " + q(image) + " 64M");
    fs::resize_file(image, 0x40000 + kCluster);
    poke_be(image, 0x30000, 0x8000000000040000ULL, 8); // L1[0] -> an L2 table at 0x40000
    poke_be(image, 0x20000 + 8, 1, 2);                 // its refcount
    poke_be(image, 0x40000, 0x8000000000020000ULL, 8); // L2[0] -> the refcount block
    Outcome o = repair_both(dir, image, "all");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
    EXPECT_NE(o.ours_err.find("ERROR refcount block 0 refcount=2"), std::string::npos)
        << o.ours_err;
    expect_clean_and_equal(dir, {});
    // The data cluster (the old refcount block) kept its bytes: the disk reads as before.
    CommandResult same = run("qemu-img compare -U " + q(dir / "ours.qcow2") + " " + q(image));
    EXPECT_EQ(same.exit_code, 0) << same.out << same.err;
    // -r leaks: both refuse (qemu: "need to rebuild refcount structures").
    Outcome leaks = repair_both(dir, image, "leaks");
    EXPECT_EQ(leaks.ours, leaks.theirs);
    EXPECT_EQ(leaks.ours, 1);
}

TEST(Repair, RebuildsARefcountBlockPastTheEndOfTheFile) {
    // qemu-iotests 108: refcount table entry 1 names a block past the end of the file. qemu
    // grows the file to reach it (or rebuilds when it cannot); we rebuild, and the counts are
    // qemu's where qemu's growing found nothing more to repair.
    TempDir dir;
    for (std::uint64_t entry : {std::uint64_t{0x100000}, std::uint64_t{0x7fffffffffff0000}}) {
        SCOPED_TRACE(fmt::format("refcount table entry {:#x}", entry));
        fs::path original;
        const fs::path image = small_image(dir, fmt::format("beyond-{:x}.qcow2", entry), original);
        poke_be(image, 0x10008, entry, 8);
        if (entry == 0x100000)
            poke_be(image, 0x20000 + 16 * 2, 1, 2); // the block's cluster counted in block 0
        Outcome o = repair_both(dir, image, "all");
        expect_same_counts(o);
        EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
        expect_clean_and_equal(dir, original);
        // Nothing was written past the new structure: the file did not grow to the block.
        EXPECT_LT(fs::file_size(dir / "ours.qcow2"), 0x100000u);
    }
}

TEST(Repair, RebuildsWhenTheRefcountTableMustGrowAsQemuImg) {
    // 512-byte clusters and 64-bit refcounts: one table cluster names 64 blocks of 64
    // refcounts, 2 MiB of clusters. 3 MiB of data needs a second table cluster; the header is
    // made to name only the first, so the last clusters have no refcount and the table would
    // have to grow (qemu rebuilds).
    TempDir dir;
    const fs::path image = dir / "grow.qcow2";
    make_image(image, "cluster_size=512,refcount_bits=64", "8M", {"write -P 9 0 3M"});
    ASSERT_EQ(peek_be(image, 56, 4), 2u);
    const fs::path original = dir / "original.qcow2";
    fs::copy_file(image, original);
    poke_be(image, 56, 1, 4);
    expect_rebuilt_as_qemu_img(dir, image, original);
}

TEST(Repair, RebuildsAnUnalignedRefcountBlockWhereQemuImgFails) {
    // A refcount table entry 512 bytes into a cluster: qemu-img finds it, starts rebuilding and
    // fails ("ERROR writing refblock: Input/output error", exit 1, the image marked corrupt).
    // We rebuild it: clean, the data as before.
    TempDir dir;
    fs::path original;
    const fs::path image = small_image(dir, "unaligned.qcow2", original);
    poke_be(image, 0x10000, 0x20200, 8);
    Outcome o = repair_both(dir, image, "all");
    EXPECT_EQ(o.theirs, 1) << o.theirs_err;
    EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
    EXPECT_EQ(json_count(o.ours_json, "corruptions-fixed"), 1u) << o.ours_json;
    CommandResult check = run("qemu-img check " + q(dir / "ours.qcow2"));
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
    CommandResult same = run("qemu-img compare -U " + q(dir / "ours.qcow2") + " " + q(original));
    EXPECT_EQ(same.exit_code, 0) << same.out << same.err;
}

/// 512-byte clusters and 64-bit refcounts (several refcount blocks to place), and a refcount
/// table entry naming the cluster just past the end of the file: a rebuild that grew the file
/// over it would, until the header switches, have the old table read new bytes as refcounts.
fs::path block_named_past_the_end_image(const TempDir& dir) {
    const fs::path image = dir / "named.qcow2";
    make_image(image, "cluster_size=512,refcount_bits=64", "1M", {"write -P 7 0 64k"});
    const std::uint64_t reftable = peek_be(image, 48, 8);
    EXPECT_EQ(peek_be(image, reftable + 40, 8), 0u) << "refcount table entry 5 in use";
    poke_be(image, reftable + 40, (fs::file_size(image) + 511) / 512 * 512, 8);
    return image;
}

TEST(Repair, RebuildLeavesTheClustersTheOldTableNamesAlone) {
    TempDir dir;
    const fs::path image = block_named_past_the_end_image(dir);
    const std::uint64_t named = peek_be(image, peek_be(image, 48, 8) + 40, 8);
    Outcome o = repair_both(dir, image, "all");
    EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
    EXPECT_NE(o.ours_err.find("Rebuilding refcount structure"), std::string::npos) << o.ours_err;
    CommandResult check = run("qemu-img check " + q(dir / "ours.qcow2"));
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
    run_ok("qemu-io -f qcow2 -c 'read -P 7 0 64k' " + q(dir / "ours.qcow2") + " >/dev/null");
    // Nothing of the new structure at the named cluster.
    const std::uint64_t reftable = peek_be(dir / "ours.qcow2", 48, 8);
    const std::uint64_t clusters = peek_be(dir / "ours.qcow2", 56, 4);
    EXPECT_FALSE(named >= reftable && named < reftable + clusters * 512);
    for (std::uint64_t i = 0; i < clusters * 512 / 8; ++i)
        EXPECT_NE(peek_be(dir / "ours.qcow2", reftable + i * 8, 8), named) << i;
}

TEST(Repair, CrashDuringRebuildNextToANamedBlockAddsNoCorruption) {
    TempDir dir;
    const fs::path image = block_named_past_the_end_image(dir);
    crash_at_every_step(image, RepairMode::all);
}

TEST(Repair, EntryFixInsideARefcountBlockIsRefusedBeforeWriting) {
    // 1 MiB clusters, no data: L1[0] names the refcount block as its L2 table. Its first word
    // (the 16-bit refcounts 1,1,1,1 of header, refcount table, block and L1 table) reads as a
    // preallocated zero cluster at an unaligned offset, which -r all would zero; but that
    // "L2 table" is the refcount block in force, and zeroing it would drop the refcounts of
    // clusters in use until the rebuild (qemu's overlap check refuses the write).
    TempDir dir;
    const fs::path image = dir / "overlap.qcow2";
    make_image(image, "cluster_size=1M,compat=1.1", "64M", {});
    const std::uint64_t reftable = peek_be(image, 48, 8);
    const std::uint64_t block = peek_be(image, reftable, 8);
    ASSERT_EQ(peek_be(image, block, 8), 0x0001000100010001ULL) << "refcounts of clusters 0-3";
    poke_be(image, peek_be(image, 40, 8), 0x8000000000000000ULL | block, 8);
    const std::vector<std::byte> before = read_file(image);
    CommandResult r = run(cli() + " check -r all " + q(image));
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("hold other metadata"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(read_file(image), before);
}

TEST(Repair, CrashDuringRebuildAddsNoCorruption) {
    TempDir dir;
    fs::path original;
    const fs::path image = small_image(dir, "notable.qcow2", original);
    poke_be(image, 48, 0, 8);
    poke_be(image, 56, 0, 4);
    crash_at_every_step(image, RepairMode::all);
}

TEST(Repair, CrashDuringRebuildOfAGrowingTableAddsNoCorruption) {
    TempDir dir;
    const fs::path image = dir / "grow.qcow2";
    // Just past what one table cluster covers (2 MiB), to keep the steps few.
    make_image(image, "cluster_size=512,refcount_bits=64", "8M", {"write -P 9 0 2304k"});
    ASSERT_EQ(peek_be(image, 56, 4), 2u);
    poke_be(image, 56, 1, 4);
    crash_at_every_step(image, RepairMode::all);
}

// ---------------------------------------------------------------------------------------------
// L2 entries qemu fixes (fix_l2_entry_by_zero, qemu-iotests 060)

/// An image whose first L2 entry is a preallocated zero cluster at the unaligned offset 0x2a00
/// (qemu-iotests 060), or `offset`: with extended L2 entries, an entry with only "reads as
/// zeros" bits.
fs::path unaligned_zero_cluster_image(const TempDir& dir, bool extended,
                                      std::uint64_t offset = 0x2a00) {
    const fs::path image =
        dir / fmt::format("unaligned-{}-{:x}.qcow2", extended ? "ext" : "zero", offset);
    make_image(image, extended ? "compat=1.1,extended_l2=on" : "compat=1.1", "64M",
               {"write -P 1 0 64k"});
    const std::uint64_t l2 = peek_be(image, peek_be(image, 40, 8), 8) & 0x00fffffffffffe00ULL;
    if (extended) {
        poke_be(image, l2, 0x8000000000000000ULL | offset, 8);
        poke_be(image, l2 + 8, 0xffffffff00000000ULL, 8);
    } else {
        poke_be(image, l2, 0x8000000000000001ULL | offset, 8);
    }
    return image;
}

TEST(Repair, UnalignedPreallocatedZeroClusterMadePlainZeroAsQemuImg) {
    TempDir dir;
    struct Case {
        bool extended;
        std::uint64_t offset;
    };
    // 0xdca000: past the end of the file, refcount 0, where the mutation loop over check -r all
    // found the entry's OFLAG_COPIED fix undoing its zeroing.
    for (const Case c : {Case{false, 0x2a00}, Case{true, 0x2a00}, Case{false, 0xdca000}}) {
        SCOPED_TRACE(fmt::format("{} L2 entries, offset {:#x}",
                                 c.extended ? "extended" : "standard", c.offset));
        const fs::path image = unaligned_zero_cluster_image(dir, c.extended, c.offset);
        EXPECT_EQ(run("qemu-img check " + q(image)).exit_code, 2);
        Outcome o = repair_both(dir, image, "all");
        expect_same_counts(o);
        EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
        EXPECT_EQ(json_count(o.ours_json, "corruptions-fixed"), 1u) << o.ours_json;
        EXPECT_EQ(json_count(o.ours_json, "leaks-fixed"), 1u) << o.ours_json;
        EXPECT_NE(o.ours_err.find(fmt::format("Repairing offset={:x}: Preallocated cluster is not "
                                              "properly aligned; L2 entry corrupted.",
                                              c.offset)),
                  std::string::npos)
            << o.ours_err;
        expect_clean_and_equal(dir, {});
        // The first 64 KiB read as zeros now, as qemu-img's result does.
        run_ok("qemu-io -f qcow2 -c 'read -P 0 0 64k' " + q(dir / "ours.qcow2") + " >/dev/null");
        // -r leaks leaves the entry, as qemu-img does; with a damaged table the references
        // may be incomplete, so we free nothing either (qemu-img frees the leak, exit 2).
        Outcome leaks = repair_both(dir, image, "leaks");
        EXPECT_EQ(leaks.theirs, 2);
        EXPECT_EQ(leaks.ours, 1) << leaks.ours_err;
        EXPECT_NE(leaks.ours_err.find("not repaired"), std::string::npos) << leaks.ours_err;
        EXPECT_EQ(read_file(dir / "ours.qcow2"), read_file(image));
    }
}

TEST(Repair, CrashWhileZeroingAnL2EntryAddsNoCorruption) {
    TempDir dir;
    const fs::path image = unaligned_zero_cluster_image(dir, false);
    crash_at_every_step(image, RepairMode::all);
}

// ---------------------------------------------------------------------------------------------
// OFLAG_COPIED flags (qemu's check_oflag_copied with BDRV_FIX_ERRORS)

/// An image whose first data cluster lost its COPIED flag (refcount 1) and, through an internal
/// snapshot, a shared cluster (refcount 2) that carries one.
fs::path wrong_flags_image(const TempDir& dir) {
    const fs::path image = dir / "flags.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 1 0 64k", "write -P 2 64k 64k"});
    run_ok("qemu-img snapshot -c snap " + q(image));
    run_ok("qemu-io -f qcow2 -c 'write -P 3 0 64k' " + q(image) + " >/dev/null");
    const std::uint64_t l1 = peek_be(image, 40, 8);
    const std::uint64_t l2 = peek_be(image, l1, 8) & 0x00fffffffffffe00ULL;
    // Entry 0 was rewritten after the snapshot (its own cluster, COPIED); entry 1 is shared.
    EXPECT_NE(peek_be(image, l2, 8) >> 63, 0u);
    EXPECT_EQ(peek_be(image, l2 + 8, 8) >> 63, 0u);
    poke_be(image, l2, peek_be(image, l2, 8) & ~(std::uint64_t{1} << 63), 8);
    poke_be(image, l2 + 8, peek_be(image, l2 + 8, 8) | (std::uint64_t{1} << 63), 8);
    return image;
}

TEST(Repair, CopiedFlagsRewrittenAsQemuImg) {
    TempDir dir;
    const fs::path image = wrong_flags_image(dir);
    EXPECT_EQ(run("qemu-img check " + q(image)).exit_code, 2);
    Outcome o = repair_both(dir, image, "all");
    expect_same_counts(o);
    EXPECT_EQ(o.ours, 0) << o.ours_json << o.ours_err;
    EXPECT_EQ(json_count(o.ours_json, "corruptions-fixed"), 2u) << o.ours_json;
    EXPECT_NE(o.ours_err.find("Repairing OFLAG_COPIED data cluster"), std::string::npos)
        << o.ours_err;
    expect_clean_and_equal(dir, image);
    // The snapshot still reads as it was taken.
    run_ok("qemu-img snapshot -a snap " + q(dir / "ours.qcow2"));
    run_ok("qemu-io -f qcow2 -c 'read -P 1 0 64k' -c 'read -P 2 64k 64k' " + q(dir / "ours.qcow2") +
           " >/dev/null");
    // -r leaks repairs them too when nothing else is left wrong, as qemu-img does.
    Outcome leaks = repair_both(dir, image, "leaks");
    expect_same_counts(leaks);
    EXPECT_EQ(leaks.ours, 0) << leaks.ours_json << leaks.ours_err;
    // With a corruption -r leaks cannot fix (a refcount too low), the flags are left.
    const std::uint64_t l2 = peek_be(image, peek_be(image, 40, 8), 8) & 0x00fffffffffffe00ULL;
    const std::uint64_t shared = (peek_be(image, l2 + 8, 8) & 0x00fffffffffffe00ULL) / kCluster;
    fs::copy_file(image, dir / "under.qcow2");
    set_refcount(dir / "under.qcow2", shared, 1);
    Outcome left = repair_both(dir, dir / "under.qcow2", "leaks");
    EXPECT_EQ(left.ours, left.theirs);
}

TEST(Repair, CrashWhileRewritingCopiedFlagsAddsNoCorruption) {
    TempDir dir;
    const fs::path image = wrong_flags_image(dir);
    crash_at_every_step(image, RepairMode::all);
}

TEST(Repair, DirtyImageWithLeaksOnlyFailsAsQemuImgAndWritesNothing) {
    TempDir dir;
    const fs::path image = dirty_image(dir);
    const std::vector<std::byte> before = read_file(image);
    Outcome o = repair_both(dir, image, "leaks");
    EXPECT_EQ(o.ours, o.theirs);
    EXPECT_EQ(o.ours, 1);
    EXPECT_EQ(read_file(dir / "ours.qcow2"), before);
}

TEST(Repair, CleanImageIsNotWritten) {
    TempDir dir;
    const fs::path image = dir / "clean.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 1 0 192k"});
    const std::vector<std::byte> before = read_file(image);
    const auto mtime = fs::last_write_time(image);
    for (const char* mode : {"leaks", "all"}) {
        CommandResult r = run(cli() + " check -r " + mode + " " + q(image));
        EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
        EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos) << r.out;
        EXPECT_EQ(r.out.find("repaired"), std::string::npos) << r.out;
    }
    EXPECT_EQ(read_file(image), before);
    EXPECT_EQ(fs::last_write_time(image), mtime);
}

TEST(Repair, LibraryReportsWhatItDid) {
    TempDir dir;
    const fs::path image = leaky_image(dir);
    auto r = repair_image(image, RepairOptions{RepairMode::leaks});
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(r->before.leaks, 3u);
    EXPECT_EQ(r->leaks_fixed, 3u);
    EXPECT_EQ(r->corruptions_fixed, 0u);
    EXPECT_TRUE(r->double_checked);
    EXPECT_EQ(r->after.leaks, 0u);
    EXPECT_EQ(r->after.corruptions, 0u);
    EXPECT_EQ(r->exit_code(), 0);
    // qemu's lines: each mismatch as found, then as repaired.
    ASSERT_EQ(r->messages.size(), 6u);
    EXPECT_EQ(r->messages[0].rfind("Leaked cluster ", 0), 0u) << r->messages[0];
    EXPECT_EQ(r->messages[3].rfind("Repairing cluster ", 0), 0u) << r->messages[3];
    // Again: nothing left to do.
    auto again = repair_image(image, RepairOptions{RepairMode::all});
    ASSERT_TRUE(again) << again.error().message;
    EXPECT_FALSE(again->double_checked);
    EXPECT_EQ(again->leaks_fixed + again->corruptions_fixed, 0u);
}

TEST(Repair, DamagedTablesRefusedBeforeWriting) {
    TempDir dir;
    const fs::path image = leaky_image(dir);
    // A reserved bit in the first L1 entry: an L1/L2 fix qcowmap does not make.
    const std::uint64_t l1 = peek_be(image, 40, 8);
    poke_be(image, l1, peek_be(image, l1, 8) | 0x2, 8);
    const std::vector<std::byte> before = read_file(image);
    for (const char* mode : {"leaks", "all"}) {
        CommandResult r = run(cli() + " check -r " + mode + " " + q(image));
        EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
        EXPECT_NE(r.err.find("not repaired"), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("reserved bits"), std::string::npos) << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    }
    EXPECT_EQ(read_file(image), before);
}

TEST(Repair, RefusedWhileQemuIoHoldsTheImage) {
    TempDir dir;
    const fs::path image = leaky_image(dir);
    CommandResult r;
    std::vector<std::byte> before;
    {
        QemuIoHolder qemu_io(image);
        ASSERT_TRUE(qemu_io.held()) << "qemu-io never took its lock";
        before = read_file(image);
        r = run("timeout -k 5 60 " + cli() + " check -r leaks " + q(image));
    }
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
    EXPECT_EQ(read_file(image), before);
}

TEST(Repair, RefusedWhileTheLibraryWritesTheImage) {
    TempDir dir;
    const fs::path image = dir / "a.qcow2";
    make_image(image, "cluster_size=64k", "64M", {"write -P 1 0 64k"});
    auto writer = WritableImage::open(image);
    ASSERT_TRUE(writer) << writer.error().message;
    auto r = repair_image(image, RepairOptions{RepairMode::all});
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, ErrorCode::image_in_use) << r.error().message;
    ASSERT_TRUE(writer->close());
    EXPECT_TRUE(repair_image(image, RepairOptions{RepairMode::all}));
}

TEST(Repair, RawFileRefusedInOneLine) {
    TempDir dir;
    run_ok("qemu-img create -q -f raw " + q(dir / "disk.raw") + " 1M");
    CommandResult raw = run(cli() + " check -r leaks " + q(dir / "disk.raw"));
    EXPECT_NE(raw.exit_code, 0);
    EXPECT_EQ(std::count(raw.err.begin(), raw.err.end(), '\n'), 1) << raw.err;
}

TEST(Repair, ReadOnlyFileRefusedInOneLine) {
    TempDir dir;
    const fs::path image = leaky_image(dir);
    fs::permissions(image, fs::perms::owner_read | fs::perms::group_read | fs::perms::others_read);
    if (::access(image.c_str(), W_OK) == 0)
        GTEST_SKIP() << "running as root: a read-only file is still writable";
    CommandResult ro = run(cli() + " check -r leaks " + q(image));
    EXPECT_EQ(ro.exit_code, 1);
    EXPECT_NE(ro.err.find("cannot open for writing"), std::string::npos) << ro.err;
    EXPECT_EQ(std::count(ro.err.begin(), ro.err.end(), '\n'), 1) << ro.err;
}

} // namespace
} // namespace qcowmap::test
