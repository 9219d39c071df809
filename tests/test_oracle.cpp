// Oracle tests: images are generated at test time with qemu-img create + qemu-io workloads and
// everything qcowmap says about them is compared with what qemu says: the raw bytes
// (`qemu-img convert -O raw`, or `qemu-img dd` of a window for the 1 TiB image), and the allocation
// map (`qemu-img map --output=json`), both through the CLI and through the library's extents.
#include "support.hpp"

#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <regex>
#include <span>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <vector>

namespace qcowmap::test {
namespace {

using test::q;

constexpr std::uint64_t kKiB = 1024;
constexpr std::uint64_t kMiB = 1024 * kKiB;
constexpr std::uint64_t kGiB = 1024 * kMiB;
constexpr std::uint64_t kTiB = 1024 * kGiB;

// ---------------------------------------------------------------------------------------------
// map --output=json parsing

/// One object of `map --output=json`. Equality covers the fields qemu-img 7.2 prints;
/// `compressed` (qemu 8.2+, and qcowmap) is kept aside and ignored by ==.
struct JsonMapEntry {
    std::uint64_t start = 0;
    std::uint64_t length = 0;
    std::uint64_t depth = 0;
    bool present = false;
    bool zero = false;
    bool data = false;
    std::optional<std::uint64_t> offset;
    std::optional<bool> compressed;

    bool operator==(const JsonMapEntry& o) const {
        return start == o.start && length == o.length && depth == o.depth && present == o.present &&
               zero == o.zero && data == o.data && offset == o.offset;
    }
    std::uint64_t end() const { return start + length; }
};

std::ostream& operator<<(std::ostream& os, const JsonMapEntry& e) {
    os << "{start " << e.start << ", length " << e.length << ", depth " << e.depth << ", present "
       << e.present << ", zero " << e.zero << ", data " << e.data;
    if (e.compressed)
        os << ", compressed " << *e.compressed;
    if (e.offset)
        os << ", offset " << *e.offset;
    return os << "}";
}

std::string describe(const std::vector<JsonMapEntry>& entries) {
    std::ostringstream os;
    for (const JsonMapEntry& e : entries)
        os << "  " << e << "\n";
    return os.str();
}

/// Parses qemu-img map's JSON: `[` then one flat object per line, `]`. Anything unexpected
/// (unknown key, missing key, bad value) fails the current test, naming `who`.
std::vector<JsonMapEntry> parse_map_json(const std::string& text, const std::string& who) {
    std::vector<JsonMapEntry> entries;
    std::size_t open_bracket = text.find('[');
    std::size_t close_bracket = text.rfind(']');
    if (open_bracket == std::string::npos || close_bracket == std::string::npos ||
        close_bracket < open_bracket) {
        ADD_FAILURE() << who << ": not a JSON array:\n" << text;
        return entries;
    }
    static const std::regex pair_re(R"re(^\s*"([a-z]+)"\s*:\s*(true|false|[0-9]+)\s*$)re");
    std::size_t pos = open_bracket + 1;
    while (true) {
        std::size_t begin = text.find('{', pos);
        if (begin == std::string::npos || begin > close_bracket)
            break;
        std::size_t end = text.find('}', begin);
        if (end == std::string::npos) {
            ADD_FAILURE() << who << ": unterminated object at " << begin;
            break;
        }
        std::string body = text.substr(begin + 1, end - begin - 1);
        JsonMapEntry e;
        std::map<std::string, int> seen;
        std::size_t field_start = 0;
        while (field_start <= body.size()) {
            std::size_t comma = body.find(',', field_start);
            if (comma == std::string::npos)
                comma = body.size();
            std::string field = body.substr(field_start, comma - field_start);
            field_start = comma + 1;
            std::smatch m;
            if (!std::regex_match(field, m, pair_re)) {
                ADD_FAILURE() << who << ": cannot parse field '" << field << "' in {" << body
                              << "}";
                continue;
            }
            const std::string key = m[1];
            const std::string value = m[2];
            const bool is_bool = value == "true" || value == "false";
            ++seen[key];
            auto as_u64 = [&]() -> std::uint64_t {
                if (is_bool) {
                    ADD_FAILURE() << who << ": key " << key << " is not a number in {" << body
                                  << "}";
                    return 0;
                }
                return std::stoull(value);
            };
            auto as_bool = [&]() -> bool {
                if (!is_bool) {
                    ADD_FAILURE() << who << ": key " << key << " is not a boolean in {" << body
                                  << "}";
                }
                return value == "true";
            };
            if (key == "start") {
                e.start = as_u64();
            } else if (key == "length") {
                e.length = as_u64();
            } else if (key == "depth") {
                e.depth = as_u64();
            } else if (key == "present") {
                e.present = as_bool();
            } else if (key == "zero") {
                e.zero = as_bool();
            } else if (key == "data") {
                e.data = as_bool();
            } else if (key == "compressed") {
                e.compressed = as_bool();
            } else if (key == "offset") {
                e.offset = as_u64();
            } else {
                ADD_FAILURE() << who << ": unknown key '" << key << "' in {" << body << "}";
            }
        }
        for (const char* required : {"start", "length", "depth", "present", "zero", "data"}) {
            EXPECT_EQ(seen[required], 1) << who << ": key " << required << " in {" << body << "}";
        }
        for (const auto& [key, count] : seen) {
            EXPECT_EQ(count, 1) << who << ": key " << key << " repeated in {" << body << "}";
        }
        entries.push_back(e);
        pos = end + 1;
    }
    return entries;
}

/// Removes `, "compressed": true|false`, the key qemu 7.2 does not print.
std::string strip_compressed_key(const std::string& text) {
    static const std::regex re(R"re(, "compressed": (true|false))re");
    return std::regex_replace(text, re, "");
}

/// The qemu-img map entries of `image` (plus `range_args` such as " --start-offset=N").
std::vector<JsonMapEntry> qemu_map(const std::filesystem::path& image,
                                   const std::string& range_args, const std::string& label,
                                   std::string* text_out = nullptr) {
    std::string text = run_ok("qemu-img map -f qcow2 --output=json" + range_args + " " + q(image));
    if (text_out)
        *text_out = text;
    return parse_map_json(text, label + ": qemu-img map");
}

/// `qcowmap map --output=json` (`ours_text`) lists exactly the entries of `qemu-img map
/// --output=json` (`qemu_text`): every field, offsets included, "compressed" aside; and the text
/// is the same once our extra "compressed" key is dropped.
void expect_same_map_json(const std::string& ours_text, const std::string& qemu_text,
                          const std::string& label) {
    std::vector<JsonMapEntry> theirs = parse_map_json(qemu_text, label + ": qemu-img map");
    std::vector<JsonMapEntry> ours = parse_map_json(ours_text, label + ": qcowmap map");
    ASSERT_FALSE(theirs.empty()) << label << ": qemu-img map printed no entries";

    bool same = ours.size() == theirs.size();
    for (std::size_t i = 0; same && i < ours.size(); ++i)
        same = ours[i] == theirs[i];
    EXPECT_TRUE(same) << label << ": entries differ\nqcowmap:\n"
                      << describe(ours) << "qemu-img:\n"
                      << describe(theirs);
    // qcowmap prints "compressed"; in a lone qcow2 image the only data qemu gives no offset
    // for is compressed data.
    for (const JsonMapEntry& e : ours) {
        ASSERT_TRUE(e.compressed.has_value()) << label << ": no \"compressed\" key in " << e;
        EXPECT_EQ(*e.compressed, e.data && !e.zero && !e.offset) << label << ": " << e;
    }
    EXPECT_EQ(strip_compressed_key(ours_text), strip_compressed_key(qemu_text))
        << label << ": JSON text differs beyond the \"compressed\" key";
}

/// `qcowmap map --output=json RANGE_ARGS IMAGE` against `qemu-img map` with the same options.
std::string qcowmap_map_json(const std::filesystem::path& image, const std::string& range_args,
                             const std::string& label) {
    CommandResult r = run(qcowmap_bin() + " map --output=json" + range_args + " " + q(image));
    EXPECT_EQ(r.exit_code, 0) << label << ": qcowmap map" << range_args << " failed: " << r.err;
    EXPECT_EQ(r.err, "") << label;
    return r.out;
}

/// Runs `produce` (our side) between two `qemu-img map` runs with the same options and returns
/// our result with qemu's text. When the host file looks metadata-preallocated, qemu (and
/// qcowmap, like it) reports holes of the host file inside data clusters as "zero", and on ext4
/// what SEEK_DATA calls a hole changes as reads fill the page cache over unwritten extents; so
/// the two sides must look at the file back to back, and the pair is retried if qemu's own
/// answer moved meanwhile.
template <typename Produce>
auto between_qemu_maps(const std::filesystem::path& image, const std::string& range_args,
                       const std::string& label, std::string& qemu_text, Produce produce) {
    for (int attempt = 0;; ++attempt) {
        std::string before;
        qemu_map(image, range_args, label, &before);
        auto ours = produce();
        qemu_map(image, range_args, label, &qemu_text);
        if (before == qemu_text || attempt == 2)
            return ours;
    }
}

void expect_map_json_matches_qemu(const std::filesystem::path& image, const std::string& range_args,
                                  const std::string& label) {
    std::string qemu_text;
    std::string ours = between_qemu_maps(image, range_args, label, qemu_text, [&] {
        return qcowmap_map_json(image, range_args, label);
    });
    expect_same_map_json(ours, qemu_text, label + " (map" + range_args + ")");
}

// ---------------------------------------------------------------------------------------------
// Library extents against qemu's map

std::string describe(const Extent& e) {
    std::string s = "[" + std::to_string(e.offset) + ", +" + std::to_string(e.length) + ") " +
                    std::string(to_string(e.kind)) + (e.present ? " present" : " absent") +
                    " depth " + std::to_string(e.depth);
    if (e.host_offset)
        s += " host " + std::to_string(*e.host_offset);
    return s;
}

/// Checks `image.extents()` on its own (coverage, spans, merging) and against the qemu-img map
/// of the whole image, range by range. `raw`, when given, is the whole disk as qemu reads it.
void expect_extents_agree(const Image& image, const std::vector<JsonMapEntry>& qemu,
                          const std::string& label, const std::vector<std::byte>* raw = nullptr) {
    std::vector<Extent> extents;
    ExtentRange it = image.extents();
    for (const Extent& e : it) {
        extents.push_back(e);
        ASSERT_LT(extents.size(), 10'000'000u) << label << ": runaway extent iterator";
    }
    ASSERT_FALSE(it.error().has_value())
        << label << ": extent walk failed: " << it.error()->message;
    EXPECT_EQ(it.walk().position(), image.size()) << label;

    const std::byte* file_begin = image.file_bytes().data();
    const std::uint64_t file_size = image.file_bytes().size();
    std::uint64_t expected_start = 0;
    for (std::size_t i = 0; i < extents.size(); ++i) {
        const Extent& x = extents[i];
        ASSERT_EQ(x.offset, expected_start)
            << label << ": extent " << i << " " << describe(x) << " leaves a gap or overlaps";
        ASSERT_GT(x.length, 0u) << label << ": empty extent " << describe(x);
        expected_start = x.offset + x.length;
        switch (x.kind) {
        case ExtentKind::data:
            EXPECT_EQ(x.bytes.size(), x.length) << label << ": " << describe(x);
            ASSERT_TRUE(x.host_offset.has_value()) << label << ": " << describe(x);
            EXPECT_LE(*x.host_offset + x.length, file_size) << label << ": " << describe(x);
            EXPECT_EQ(x.bytes.data(), file_begin + *x.host_offset)
                << label << ": data span does not start at its host offset: " << describe(x);
            if (raw && x.bytes.size() == x.length && x.offset + x.length <= raw->size()) {
                EXPECT_EQ(0, std::memcmp(x.bytes.data(), raw->data() + x.offset, x.length))
                    << label << ": data extent bytes differ from qemu's raw " << describe(x);
            }
            break;
        case ExtentKind::zero:
            EXPECT_TRUE(x.bytes.empty()) << label << ": zero extent with bytes " << describe(x);
            break;
        case ExtentKind::compressed:
            EXPECT_FALSE(x.bytes.empty()) << label << ": " << describe(x);
            EXPECT_FALSE(x.host_offset.has_value()) << label << ": " << describe(x);
            break;
        }
        // Documented merging: same kind, presence and depth, host offsets continuing.
        if (i > 0) {
            const Extent& p = extents[i - 1];
            if (p.kind == x.kind && p.kind != ExtentKind::compressed && p.present == x.present &&
                p.depth == x.depth) {
                bool contiguous = false;
                if (p.host_offset && x.host_offset) {
                    contiguous = *p.host_offset + p.length == *x.host_offset;
                } else if (!p.host_offset && !x.host_offset) {
                    contiguous = true;
                }
                EXPECT_FALSE(contiguous)
                    << label << ": adjacent extents should have merged: " << describe(p) << " and "
                    << describe(x);
            }
        }
    }
    EXPECT_EQ(expected_start, image.size()) << label << ": extents do not cover the disk";

    // Walk both lists together, piece by piece.
    ASSERT_FALSE(qemu.empty()) << label;
    EXPECT_EQ(qemu.front().start, 0u) << label;
    EXPECT_EQ(qemu.back().end(), image.size()) << label;
    std::size_t xi = 0;
    std::size_t qi = 0;
    std::uint64_t pos = 0;
    int reported = 0;
    while (xi < extents.size() && qi < qemu.size() && reported < 10) {
        const Extent& x = extents[xi];
        const JsonMapEntry& m = qemu[qi];
        ASSERT_EQ(m.start <= pos && pos < m.end(), true)
            << label << ": qemu-img map is not contiguous at " << pos;
        const std::uint64_t piece_end = std::min(x.offset + x.length, m.end());
        auto fail = [&](const std::string& what) {
            ++reported;
            ADD_FAILURE() << label << ": at virtual offset " << pos << " (piece up to " << piece_end
                          << "): " << what << "\n  extent " << describe(x) << "\n  qemu   " << m;
        };
        if (x.present != m.present)
            fail("present differs");
        if (x.depth != m.depth)
            fail("depth differs");
        // Host offset of `pos` as each side sees it.
        std::optional<std::uint64_t> x_host;
        if (x.host_offset)
            x_host = *x.host_offset + (pos - x.offset);
        std::optional<std::uint64_t> m_host;
        if (m.offset)
            m_host = *m.offset + (pos - m.start);
        if (m.data && !m.zero) {
            if (m.offset) {
                if (x.kind != ExtentKind::data) {
                    fail("qemu says data, extent is " + std::string(to_string(x.kind)));
                } else if (x_host != m_host) {
                    fail("host offsets differ");
                }
            } else if (x.kind != ExtentKind::compressed) {
                fail("qemu says data without offset (compressed), extent is " +
                     std::string(to_string(x.kind)));
            }
        } else if (!m.data) {
            if (x.kind != ExtentKind::zero)
                fail("qemu says zero, extent is " + std::string(to_string(x.kind)));
            else if (x_host && m_host && x_host != m_host)
                fail("host offsets differ");
        } else {
            // data + zero: an allocated cluster over a hole of the host file, reported by qemu's
            // metadata-preallocation heuristic. Either reading is right, never a compressed one.
            if (x.kind == ExtentKind::compressed)
                fail("compressed where qemu says data+zero");
            if (x.kind == ExtentKind::data && x_host != m_host)
                fail("host offsets differ");
        }
        pos = piece_end;
        if (pos == x.offset + x.length)
            ++xi;
        if (pos == m.end())
            ++qi;
    }
    if (reported == 0) {
        EXPECT_EQ(pos, image.size()) << label << ": pairing stopped early";
    }
}

// ---------------------------------------------------------------------------------------------
// Byte comparisons

/// Compares two byte vectors, reporting the first difference instead of dumping megabytes.
void expect_same_bytes(const std::vector<std::byte>& actual, const std::vector<std::byte>& expected,
                       const std::string& label) {
    EXPECT_EQ(actual.size(), expected.size()) << label << ": sizes differ";
    const std::size_t n = std::min(actual.size(), expected.size());
    auto mismatch = std::mismatch(actual.begin(), actual.begin() + static_cast<std::ptrdiff_t>(n),
                                  expected.begin());
    if (mismatch.first != actual.begin() + static_cast<std::ptrdiff_t>(n)) {
        const auto at = mismatch.first - actual.begin();
        ADD_FAILURE() << label << ": first difference at byte " << at << ": got 0x" << std::hex
                      << std::to_integer<int>(*mismatch.first) << ", qemu has 0x"
                      << std::to_integer<int>(*mismatch.second) << std::dec;
    }
}

/// Reads `[offset, offset + length)` through the library and compares it with `expected`,
/// which holds the disk's bytes from `base` on (the short count at the end of the disk included).
void expect_read_matches(const Image& image, std::uint64_t offset, std::uint64_t length,
                         const std::vector<std::byte>& expected, std::uint64_t base,
                         const std::string& label) {
    std::vector<std::byte> buffer(length, std::byte{0x5a});
    Result<std::size_t> got = image.read(buffer, offset);
    ASSERT_TRUE(got) << label << ": read(" << offset << ", " << length
                     << ") failed: " << got.error().message;
    const std::uint64_t want =
        offset >= image.size() ? 0 : std::min<std::uint64_t>(length, image.size() - offset);
    ASSERT_EQ(*got, want) << label << ": read(" << offset << ", " << length << ") count";
    ASSERT_GE(offset, base) << label;
    ASSERT_LE(offset - base + want, expected.size()) << label << ": test window too small";
    const std::byte* ref = expected.data() + (offset - base);
    if (std::memcmp(buffer.data(), ref, want) != 0) {
        std::size_t i = 0;
        while (buffer[i] == ref[i])
            ++i;
        ADD_FAILURE() << label << ": read(" << offset << ", " << length
                      << ") differs first at virtual offset " << offset + i << ": got 0x"
                      << std::hex << std::to_integer<int>(buffer[i]) << ", qemu has 0x"
                      << std::to_integer<int>(ref[i]) << std::dec;
    }
}

/// A whole file in one read (the support helper goes byte by byte; these files reach 32 MiB).
std::vector<std::byte> slurp(const std::filesystem::path& path) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) {
        ADD_FAILURE() << "cannot stat " << path << ": " << ec.message();
        return {};
    }
    std::vector<std::byte> bytes(size);
    std::ifstream in(path, std::ios::binary);
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
    EXPECT_EQ(in.gcount(), static_cast<std::streamsize>(size)) << "short read of " << path;
    return bytes;
}

std::uint64_t allocated_bytes(const std::filesystem::path& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        ADD_FAILURE() << "stat " << path << " failed";
        return 0;
    }
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

// ---------------------------------------------------------------------------------------------
// The table of generated images

struct OracleCase {
    std::string name;
    std::string options;         ///< qemu-img create -o
    std::uint64_t size;          ///< virtual size asked of qemu-img create
    std::vector<std::string> io; ///< qemu-io commands, in order
    std::uint64_t cluster_size;  ///< as set in `options` (for read lengths and slack)
};

std::ostream& operator<<(std::ostream& os, const OracleCase& c) {
    return os << c.name;
}

std::string str(std::uint64_t value) {
    return std::to_string(value);
}

/// A workload over the first 16 clusters (c = cluster size) and the last bytes of the disk:
/// patterned writes at unaligned offsets crossing cluster boundaries, partial and whole-cluster
/// zero writes, a discard followed by a partial rewrite, overwrites.
std::vector<std::string> common_workload(std::uint64_t c, std::uint64_t size) {
    return {
        "write -P 0x11 " + str(c / 2 + 3) + " " + str(2 * c + 100), // clusters 0..2, unaligned
        "write -P 0x22 " + str(4 * c - 7) + " 14",                  // straddles clusters 3|4
        "write -z " + str(c + 100) + " " + str(c / 3),              // zeros inside data
        "write -z " + str(4 * c + c / 4) + " " + str(c / 2),        // zeros in a partial cluster
        "write -z " + str(5 * c) + " " + str(2 * c),                // zero clusters on nothing
        "write -P 0x33 " + str(7 * c) + " " + str(3 * c),
        "discard " + str(8 * c) + " " + str(c),                   // hole in the middle
        "write -P 0x55 " + str(8 * c + c / 4) + " " + str(c / 2), // partial rewrite of it
        "write -P 0x44 " + str(10 * c) + " " + str(2 * c),
        "write -z " + str(10 * c + c / 2) + " " + str(c), // zeros across 10|11
        "write -P 0x66 " + str(12 * c) + " " + str(c),
        "discard " + str(12 * c + c / 2) + " " + str(c / 2), // partial discard
        "write -P 0x77 " + str(13 * c) + " " + str(c),
        "write -P 0x78 " + str(13 * c + 1) + " " + str(c - 2), // overwrite
        "write -P 0x99 " + str(size - 5000) + " 5000",         // the very end of the disk
        "write -P 0x9a " + str(size / 2 + 333) + " " + str(3 * c + 1000),
        "discard " + str(size / 2 + c) + " " + str(c),
    };
}

/// Sub-cluster work for extended L2 (32 subclusters of c/32 per cluster), in clusters 14..15.
std::vector<std::string> subcluster_workload(std::uint64_t c) {
    const std::uint64_t sc = c / 32;
    const std::uint64_t base = 14 * c;
    return {
        "write -P 0xa1 " + str(base + 3 * sc + 17) + " " + str(2 * sc), // 3 subclusters, unaligned
        "write -P 0xa2 " + str(base + 10 * sc) + " " + str(sc),         // exactly one subcluster
        "write -z " + str(base + 20 * sc) + " " + str(3 * sc),          // zero subclusters
        "write -z " + str(base + 3 * sc + 100) + " " + str(sc / 2),     // zeros inside data
        "write -P 0xa3 " + str(base + 31 * sc + 5) + " " + str(2 * sc), // straddles 14|15
        "discard " + str(base + 10 * sc) + " " + str(sc),               // a subcluster discard
        "write -P 0xa4 " + str(base + 15 * c / 16) + " 1",              // a single byte
    };
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

std::vector<OracleCase> oracle_cases() {
    std::vector<OracleCase> cases;
    auto add = [&](std::string name, std::string options, std::uint64_t size, std::uint64_t c,
                   std::vector<std::string> extra = {}) {
        cases.push_back({std::move(name), std::move(options), size,
                         concat(common_workload(c, size), extra), c});
    };
    add("v2_64k", "compat=0.10", 4 * kMiB, 64 * kKiB);
    add("v2_4k", "compat=0.10,cluster_size=4k", 2 * kMiB, 4 * kKiB);
    add("v3_512", "compat=1.1,cluster_size=512", 2 * kMiB, 512);
    add("v3_4k", "compat=1.1,cluster_size=4k", 4 * kMiB, 4 * kKiB);
    add("v3_64k", "compat=1.1,cluster_size=64k", 4 * kMiB, 64 * kKiB);
    add("v3_2M", "compat=1.1,cluster_size=2M", 32 * kMiB, 2 * kMiB);
    add("xl2_16k", "extended_l2=on,cluster_size=16k", 2 * kMiB, 16 * kKiB,
        subcluster_workload(16 * kKiB));
    add("xl2_64k", "extended_l2=on,cluster_size=64k", 4 * kMiB, 64 * kKiB,
        subcluster_workload(64 * kKiB));
    add("xl2_2M", "extended_l2=on,cluster_size=2M", 32 * kMiB, 2 * kMiB,
        subcluster_workload(2 * kMiB));
    add("refcount1_4k", "refcount_bits=1,cluster_size=4k", 2 * kMiB, 4 * kKiB);
    add("refcount64_64k", "refcount_bits=64", 4 * kMiB, 64 * kKiB);
    add("prealloc_metadata", "preallocation=metadata", 4 * kMiB, 64 * kKiB);
    add("prealloc_metadata_xl2", "preallocation=metadata,extended_l2=on,cluster_size=32k", 2 * kMiB,
        32 * kKiB, subcluster_workload(32 * kKiB));
    const std::uint64_t c64 = 64 * kKiB;
    add("compressed_zlib", "compression_type=zlib", 4 * kMiB, c64,
        {"write -c -P 0xc1 " + str(20 * c64) + " " + str(2 * c64),
         "write -c -P 0xc2 " + str(24 * c64) + " " + str(c64),
         "write -P 0xc3 " + str(21 * c64 + 100) + " 50"}); // rewrites a compressed cluster
    add("compressed_zstd", "compression_type=zstd", 4 * kMiB, c64,
        {"write -c -P 0xd1 " + str(20 * c64) + " " + str(2 * c64),
         "write -c -P 0xd2 " + str(30 * c64) + " " + str(c64),
         "write -z " + str(30 * c64 + 4096) + " 4096"});

    // Not a multiple of the cluster size: qemu rounds 1000000 up to 1000448 (512-byte multiple);
    // the last cluster (983040..) is partial.
    const std::uint64_t odd = 1000448;
    cases.push_back(
        {"odd_size_64k",
         "cluster_size=64k",
         1000000,
         {"write -P 0xe1 1000 70000", "write -z 196608 65536", "write -P 0xe2 300000 123457",
          "discard 458752 65536", "write -P 0xe3 " + str(odd - 1448 - 20000) + " 20000",
          "write -P 0xcc 999000 " + str(odd - 999000), "write -z 999500 100"},
         64 * kKiB});
    return cases;
}

struct Prepared {
    bool ok = false;
    std::filesystem::path image;
    std::filesystem::path qemu_raw; ///< qemu-img convert -O raw output, kept for sparseness
    std::string qemu_map_text;      ///< qemu-img map --output=json
    std::vector<JsonMapEntry> qemu_map;
    std::optional<std::filesystem::path> converted; ///< qcowmap convert output, made once
};

/// One test per property and case. Each case's image, qemu's raw copy and qemu's map are made
/// once and shared by the tests of that case; raw bytes are read back from disk when needed so
/// that the whole table is never held in memory.
class OracleTest : public ::testing::TestWithParam<OracleCase> {
  protected:
    static void SetUpTestSuite() { dir_ = std::make_unique<TempDir>(); }
    static void TearDownTestSuite() {
        cache_.clear();
        dir_.reset();
    }

    /// The case's image, generated on first use.
    Prepared& prepared() {
        const OracleCase& c = GetParam();
        auto found = cache_.find(c.name);
        if (found != cache_.end())
            return found->second;
        Prepared p;
        p.image = *dir_ / (c.name + ".qcow2");
        p.qemu_raw = *dir_ / (c.name + ".qemu.raw");
        make_image(p.image, c.options, str(c.size), c.io);
        CommandResult check = run("qemu-img check -q -f qcow2 " + q(p.image));
        EXPECT_EQ(check.exit_code, 0) << c.name << ": qemu-img check: " << check.out << check.err;
        run_ok("qemu-img convert -f qcow2 -O raw " + q(p.image) + " " + q(p.qemu_raw));
        p.qemu_map = qemu_map(p.image, "", c.name, &p.qemu_map_text);
        p.ok = !HasFailure() && std::filesystem::exists(p.qemu_raw) && !p.qemu_map.empty();
        return cache_.emplace(c.name, std::move(p)).first->second;
    }

    /// qemu's raw bytes of the case.
    std::vector<std::byte> raw(const Prepared& p) { return slurp(p.qemu_raw); }

    /// `qcowmap convert IMAGE OUT`, run once per case; nullopt when it failed.
    std::optional<std::filesystem::path> converted(Prepared& p) {
        if (!p.converted) {
            auto out = *dir_ / (GetParam().name + ".convert.raw");
            CommandResult r = run(qcowmap_bin() + " convert " + q(p.image) + " " + q(out));
            EXPECT_EQ(r.exit_code, 0) << GetParam().name << ": qcowmap convert failed: " << r.err;
            if (r.exit_code != 0)
                return std::nullopt;
            p.converted = out;
        }
        return p.converted;
    }

    static inline std::unique_ptr<TempDir> dir_;
    static inline std::map<std::string, Prepared> cache_;
};

TEST_P(OracleTest, CatMatchesQemuConvert) {
    const OracleCase& c = GetParam();
    const Prepared& p = prepared();
    ASSERT_TRUE(p.ok) << c.name << ": could not generate the image";
    auto out = *dir_ / (c.name + ".cat.raw");
    CommandResult r = run(qcowmap_bin() + " cat " + q(p.image) + " > " + q(out));
    ASSERT_EQ(r.exit_code, 0) << c.name << ": qcowmap cat failed: " << r.err;
    EXPECT_EQ(r.err, "") << c.name;
    expect_same_bytes(slurp(out), raw(p), c.name + ": qcowmap cat vs qemu-img convert");
    std::filesystem::remove(out);
}

TEST_P(OracleTest, ConvertMatchesQemuAndHolesZeroRuns) {
    const OracleCase& c = GetParam();
    Prepared& p = prepared();
    ASSERT_TRUE(p.ok) << c.name << ": could not generate the image";
    auto out = converted(p);
    ASSERT_TRUE(out.has_value());
    const std::vector<std::byte> expected = raw(p);
    expect_same_bytes(slurp(*out), expected, c.name + ": qcowmap convert vs qemu-img convert");
    EXPECT_EQ(std::filesystem::file_size(*out), expected.size()) << c.name;
    // What qemu-img map reports as not data (zero clusters, unallocated ranges) must be a hole:
    // at most the data ranges (rounded out to 4 KiB blocks) are allocated, plus slack. Data
    // ranges qemu also calls zero (host-file holes under its metadata-preallocation heuristic,
    // which depends on the page cache) count as data here: see ConvertIsAsSparseAsQemuImgConvert.
    std::uint64_t data_bytes = 0;
    for (const JsonMapEntry& e : p.qemu_map) {
        if (e.data) {
            data_bytes += (e.end() + 4095) / 4096 * 4096 - e.start / 4096 * 4096;
        }
    }
    const std::uint64_t slack = std::max<std::uint64_t>(c.cluster_size, 64 * kKiB);
    const std::uint64_t ours = allocated_bytes(*out);
    EXPECT_LE(ours, data_bytes + slack)
        << c.name << ": qcowmap convert allocates " << ours << " bytes where qemu-img map has "
        << data_bytes << " bytes of data";
}

TEST_P(OracleTest, ConvertIsAsSparseAsQemuImgConvert) {
    const OracleCase& c = GetParam();
    Prepared& p = prepared();
    ASSERT_TRUE(p.ok) << c.name << ": could not generate the image";
    auto out = converted(p);
    ASSERT_TRUE(out.has_value());
    // qemu-img convert (default -S 4k) also leaves holes for zero-filled 4 KiB blocks inside
    // allocated data; the issue asks for no more than its allocation plus one cluster / 64 KiB.
    const std::uint64_t ours = allocated_bytes(*out);
    const std::uint64_t theirs = allocated_bytes(p.qemu_raw);
    const std::uint64_t slack = std::max<std::uint64_t>(c.cluster_size, 64 * kKiB);
    EXPECT_LE(ours, theirs + slack) << c.name << ": qcowmap convert allocates " << ours
                                    << " bytes, qemu-img convert " << theirs;
}

TEST_P(OracleTest, RandomReadsMatchRaw) {
    const OracleCase& c = GetParam();
    const Prepared& p = prepared();
    ASSERT_TRUE(p.ok) << c.name << ": could not generate the image";
    auto image = Image::open(p.image);
    ASSERT_TRUE(image) << c.name << ": " << image.error().message;
    const std::vector<std::byte> expected = raw(p);
    const std::uint64_t size = image->size();
    ASSERT_EQ(size, expected.size()) << c.name;

    std::mt19937_64 rng(0x9c0f'17a2'5eedULL);
    const std::uint64_t max_len = std::max<std::uint64_t>(3 * c.cluster_size, 16 * kKiB);
    auto uniform = [&](std::uint64_t lo, std::uint64_t hi) {
        return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng);
    };
    for (int i = 0; i < 200; ++i) {
        std::uint64_t length = i % 4 == 0 ? uniform(1, 600) : uniform(1, max_len);
        // Every eighth read starts close enough to the end to cross it.
        std::uint64_t offset =
            i % 8 == 7 ? size - std::min(size, uniform(0, max_len)) : uniform(0, size - 1);
        expect_read_matches(*image, offset, length, expected, 0,
                            c.name + " read #" + std::to_string(i));
        if (HasFailure())
            break; // one well-described failure beats 200
    }
    // Edges: the whole disk and more, nothing at the very end, past the end.
    expect_read_matches(*image, 0, size + 100, expected, 0, c.name + " whole disk");
    expect_read_matches(*image, size, 10, expected, 0, c.name + " at end");
    std::vector<std::byte> one(1);
    Result<std::size_t> past = image->read(one, size + 1);
    ASSERT_FALSE(past) << c.name << ": read past the end succeeded";
    EXPECT_EQ(past.error().code, ErrorCode::out_of_range) << c.name << ": " << past.error().message;
}

TEST_P(OracleTest, MapJsonMatchesQemu) {
    // `qcowmap map --output=json` and the library's map_image, both against qemu-img map.
    const OracleCase& c = GetParam();
    const Prepared& p = prepared();
    ASSERT_TRUE(p.ok) << c.name << ": could not generate the image";
    auto image = Image::open(p.image);
    ASSERT_TRUE(image) << c.name << ": " << image.error().message;
    std::string qemu_text;
    auto [cli_text, library] = between_qemu_maps(p.image, "", c.name, qemu_text, [&] {
        std::string text = qcowmap_map_json(p.image, "", c.name);
        std::vector<JsonMapEntry> entries;
        Result<void> walked =
            map_image(*image, MapOptions{}, [&](const MapEntry& e) -> Result<void> {
                entries.push_back({e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset,
                                   e.compressed});
                return {};
            });
        EXPECT_TRUE(walked) << c.name << ": map_image: " << walked.error().message;
        return std::pair{text, entries};
    });
    expect_same_map_json(cli_text, qemu_text, c.name + " (qcowmap map)");
    const std::vector<JsonMapEntry> theirs = parse_map_json(qemu_text, c.name + ": qemu-img map");
    EXPECT_TRUE(library == theirs) << c.name << ": map_image differs\nmap_image:\n"
                                   << describe(library) << "qemu-img:\n"
                                   << describe(theirs);
}

TEST_P(OracleTest, ExtentsAgreeWithQemuMap) {
    const OracleCase& c = GetParam();
    const Prepared& p = prepared();
    ASSERT_TRUE(p.ok) << c.name << ": could not generate the image";
    auto image = Image::open(p.image);
    ASSERT_TRUE(image) << c.name << ": " << image.error().message;
    const std::vector<std::byte> expected = raw(p);
    expect_extents_agree(*image, p.qemu_map, c.name, &expected);
}

INSTANTIATE_TEST_SUITE_P(Generated, OracleTest, ::testing::ValuesIn(oracle_cases()),
                         [](const ::testing::TestParamInfo<OracleCase>& info) {
                             return info.param.name;
                         });

// ---------------------------------------------------------------------------------------------
// --start-offset / --max-length

TEST(OracleMapRange, StartOffsetAndMaxLengthMatchQemu) {
    TempDir dir;
    struct Subject {
        std::string name;
        std::string options;
        std::uint64_t size;
        std::uint64_t c;
        std::vector<std::string> io;
    };
    const std::vector<Subject> subjects = {
        {"xl2_16k", "extended_l2=on,cluster_size=16k", 2 * kMiB, 16 * kKiB,
         concat(common_workload(16 * kKiB, 2 * kMiB), subcluster_workload(16 * kKiB))},
    };
    for (const Subject& s : subjects) {
        auto image = dir / (s.name + ".qcow2");
        make_image(image, s.options, str(s.size), s.io);
        const std::uint64_t c = s.c;
        const std::vector<std::pair<std::uint64_t, std::optional<std::uint64_t>>> ranges = {
            {1000, 123457},
            {c / 2 + 3, 2 * c + 99},   // starts inside the first data run
            {4 * c - 3, 7},            // inside the 14-byte straddling write
            {5 * c + 511, 3 * c + 1},  // zero clusters into data
            {8 * c + 1, std::nullopt}, // to the end of the disk
            {14 * c + 777, c + 4097},  // across the subcluster work
            {s.size - 4999, 1 * kMiB}, // runs past the end of the disk
            {s.size / 2 + 1, 1},       // a single byte
        };
        for (const auto& [start, length] : ranges) {
            std::string args = " --start-offset=" + str(start);
            if (length)
                args += " --max-length=" + str(*length);
            expect_map_json_matches_qemu(image, args, s.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency: one shared Image, two threads

TEST(OracleConcurrency, TwoThreadsReadOneSharedImage) {
    TempDir dir;
    const std::uint64_t c = 16 * kKiB;
    auto path = dir / "shared.qcow2";
    make_image(path, "extended_l2=on,cluster_size=16k", str(4 * kMiB),
               concat(concat(common_workload(c, 4 * kMiB), subcluster_workload(c)),
                      {"write -c -P 0xf1 " + str(100 * c) + " " + str(4 * c)}));
    std::vector<std::byte> raw = qemu_raw(path, dir);
    auto opened = Image::open(path);
    ASSERT_TRUE(opened) << opened.error().message;
    const Image image = *opened;
    ASSERT_EQ(image.size(), raw.size());

    struct Outcome {
        int reads = 0;
        int mismatches = 0;
        int errors = 0;
        std::uint64_t first_bad_offset = UINT64_MAX;
        std::uint64_t first_bad_length = 0;
        std::string first_error;
    };
    std::array<Outcome, 2> outcomes;
    auto worker = [&](int index) {
        Outcome& out = outcomes[static_cast<std::size_t>(index)];
        std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(index));
        std::vector<std::byte> buffer;
        for (int i = 0; i < 1500; ++i) {
            std::uint64_t offset =
                std::uniform_int_distribution<std::uint64_t>(0, image.size() - 1)(rng);
            std::uint64_t length = std::uniform_int_distribution<std::uint64_t>(1, 5 * c)(rng);
            buffer.assign(length, std::byte{0});
            Result<std::size_t> got = image.read(buffer, offset);
            ++out.reads;
            const std::uint64_t want = std::min(length, image.size() - offset);
            if (!got) {
                if (out.errors++ == 0)
                    out.first_error = got.error().message;
                continue;
            }
            if (*got != want || std::memcmp(buffer.data(), raw.data() + offset, want) != 0) {
                if (out.mismatches++ == 0) {
                    out.first_bad_offset = offset;
                    out.first_bad_length = length;
                }
            }
        }
    };
    std::thread a(worker, 0);
    std::thread b(worker, 1);
    a.join();
    b.join();
    for (std::size_t t = 0; t < outcomes.size(); ++t) {
        const Outcome& o = outcomes[t];
        EXPECT_EQ(o.reads, 1500) << "thread " << t;
        EXPECT_EQ(o.errors, 0) << "thread " << t << ": " << o.first_error;
        EXPECT_EQ(o.mismatches, 0) << "thread " << t << ": first bad read(" << o.first_bad_offset
                                   << ", " << o.first_bad_length << ")";
    }
}

// ---------------------------------------------------------------------------------------------
// A 1 TiB sparse image: never read in full, never converted.

/// One qemu-io operation of the 1 TiB workload.
struct HugeOp {
    enum class Kind { pattern, zero, discard };
    Kind kind;
    std::uint64_t offset;
    std::uint64_t length;
    std::uint8_t pattern = 0;

    std::string command() const {
        switch (kind) {
        case Kind::pattern:
            return "write -P " + str(pattern) + " " + str(offset) + " " + str(length);
        case Kind::zero:
            return "write -z " + str(offset) + " " + str(length);
        case Kind::discard:
            return "discard " + str(offset) + " " + str(length);
        }
        return {};
    }
};

const std::vector<HugeOp>& huge_ops() {
    using K = HugeOp::Kind;
    static const std::vector<HugeOp> ops = {
        {K::pattern, 0, 64 * kKiB, 0x11},
        {K::pattern, 512 * kGiB, 100000, 0x22},
        {K::pattern, 768 * kGiB + 123, 70000, 0x44},
        {K::zero, 256 * kGiB, 128 * kKiB},             // zero clusters far from anything
        {K::pattern, kTiB - 4 * kKiB, 4 * kKiB, 0x33}, // the last 4 KiB of the disk
        {K::pattern, kTiB - 200 * kKiB + 7, 1000, 0x55},
        {K::pattern, 700 * kGiB, 192 * kKiB, 0x66},
        {K::discard, 700 * kGiB + 64 * kKiB, 64 * kKiB}, // a hole in the middle of it
        {K::zero, 700 * kGiB + 150 * kKiB, 1000},        // zeros inside data
    };
    return ops;
}

/// The byte op `i` leaves at `offset` unless a later op overwrites it (then nullopt).
std::optional<int> expected_byte(std::size_t i, std::uint64_t offset) {
    const auto& ops = huge_ops();
    for (std::size_t j = i + 1; j < ops.size(); ++j) {
        if (offset >= ops[j].offset && offset < ops[j].offset + ops[j].length)
            return std::nullopt;
    }
    return ops[i].kind == HugeOp::Kind::pattern ? ops[i].pattern : 0;
}

class OracleSparse1TiB : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        dir_ = std::make_unique<TempDir>();
        image_ = *dir_ / "huge.qcow2";
        std::vector<std::string> io;
        for (const HugeOp& op : huge_ops())
            io.push_back(op.command());
        make_image(image_, "", "1T", io);
    }
    static void TearDownTestSuite() { dir_.reset(); }

    /// `[offset, offset + 64k * blocks)` of the disk as qemu reads it, through qemu-img dd.
    static std::vector<std::byte> qemu_window(std::uint64_t offset, std::uint64_t blocks) {
        const std::uint64_t bs = 64 * kKiB;
        EXPECT_EQ(offset % bs, 0u);
        const std::uint64_t skip = offset / bs;
        auto out = *dir_ / ("window-" + str(skip) + ".raw");
        // qemu-img 7.2 dd caps the input at count*bs before applying skip, so count must
        // include the skipped blocks.
        run_ok("qemu-img dd -f qcow2 -O raw bs=" + str(bs) + " skip=" + str(skip) +
               " count=" + str(skip + blocks) + " if=" + q(image_) + " of=" + q(out));
        auto bytes = slurp(out);
        std::filesystem::remove(out);
        return bytes;
    }

    static inline std::unique_ptr<TempDir> dir_;
    static inline std::filesystem::path image_;
};

TEST_F(OracleSparse1TiB, MapJsonMatchesQemu) {
    expect_map_json_matches_qemu(image_, "", "1TiB");
    expect_map_json_matches_qemu(image_,
                                 " --start-offset=" + str(512 * kGiB - 1000) +
                                     " --max-length=" + str(300 * kGiB + 5),
                                 "1TiB");
}

TEST_F(OracleSparse1TiB, ExtentsAgreeWithQemuMap) {
    auto image = Image::open(image_);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->size(), kTiB);
    expect_extents_agree(*image, qemu_map(image_, "", "1TiB"), "1TiB");
}

TEST_F(OracleSparse1TiB, ReadsMatchQemuAroundWrites) {
    auto image = Image::open(image_);
    ASSERT_TRUE(image) << image.error().message;
    std::mt19937_64 rng(42);
    const auto& ops = huge_ops();
    for (std::size_t op_index = 0; op_index < ops.size(); ++op_index) {
        const HugeOp& w = ops[op_index];
        // A window of whole 64 KiB blocks around the write, one block of margin each side
        // (clipped to the disk).
        const std::uint64_t bs = 64 * kKiB;
        const std::uint64_t first = w.offset / bs == 0 ? 0 : w.offset / bs - 1;
        const std::uint64_t last = std::min((w.offset + w.length + bs - 1) / bs + 1, kTiB / bs);
        const std::uint64_t base = first * bs;
        std::vector<std::byte> window = qemu_window(base, last - first);
        ASSERT_EQ(window.size(), (last - first) * bs) << "window at " << base;
        const std::string label = "1TiB op \"" + w.command() + "\"";

        // qemu itself agrees with the workload: what the op wrote is there.
        for (std::uint64_t i = 0; i < w.length; i += 97) {
            if (auto want = expected_byte(op_index, w.offset + i)) {
                ASSERT_EQ(std::to_integer<int>(window[w.offset - base + i]), *want)
                    << label << ": qemu window at " << w.offset + i;
            }
        }
        // The written range itself, the whole window, then random unaligned pieces.
        expect_read_matches(*image, w.offset, w.length, window, base, label + " exact");
        expect_read_matches(*image, base, window.size(), window, base, label + " window");
        const std::uint64_t window_end = base + window.size();
        for (int i = 0; i < 40; ++i) {
            std::uint64_t offset =
                std::uniform_int_distribution<std::uint64_t>(base, window_end - 1)(rng);
            std::uint64_t length = std::uniform_int_distribution<std::uint64_t>(
                1, window_end == kTiB ? 3 * bs : window_end - offset)(rng);
            expect_read_matches(*image, offset, length, window, base,
                                label + " piece " + std::to_string(i));
        }
    }
    // Reads crossing the end of the disk come back short.
    std::vector<std::byte> tail = qemu_window(kTiB - 64 * kKiB, 1);
    expect_read_matches(*image, kTiB - 1000, 5000, tail, kTiB - 64 * kKiB, "1TiB across the end");
    expect_read_matches(*image, kTiB, 10, tail, kTiB - 64 * kKiB, "1TiB at the end");
}

TEST_F(OracleSparse1TiB, UnwrittenRangesReadAsZeros) {
    auto image = Image::open(image_);
    ASSERT_TRUE(image) << image.error().message;
    const std::vector<std::byte> zeros(1 * kMiB + 4097);
    const std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges = {
        {64 * kKiB, zeros.size()},           {100 * kGiB + 12345, zeros.size()},
        {256 * kGiB + 1, zeros.size()},      // zero clusters, then nothing
        {700 * kGiB + 64 * kKiB + 3, 60000}, // the discarded cluster
        {700 * kGiB + 150 * kKiB, 1000},     // the zero write inside data
        {900 * kGiB - 77, zeros.size()},     {kTiB - 2 * kMiB - 4097, zeros.size()},
    };
    for (const auto& [offset, length] : ranges) {
        expect_read_matches(*image, offset, length, zeros, offset,
                            "1TiB unwritten at " + str(offset));
    }
}

} // namespace
} // namespace qcowmap::test
