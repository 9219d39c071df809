// create(): a new, empty qcow2 image laid out as qemu-img create lays it out (block/qcow2.c
// qcow2_co_create: header, refcount table, refcount block, L1 table), written under a temporary
// name, synced, and renamed into place.
#include "bytes.hpp"
#include "errors.hpp"
#include "sys_io.hpp"
#include "writer_layout.hpp"

#include <qcowmap/format.hpp>
#include <qcowmap/writable.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap {
namespace {

using namespace detail::writer;

Error bad_option(std::string message) {
    return Error{ErrorCode::invalid_argument, std::move(message)};
}

Result<bool> parse_bool(std::string_view key, std::string_view value) {
    if (value == "on" || value == "true" || value == "yes")
        return true;
    if (value == "off" || value == "false" || value == "no")
        return false;
    return bad_option(fmt::format("option {}: '{}' is not on or off", key, value));
}

/// A size with qemu's binary suffixes (k, M, G, T, P, E; b for bytes).
Result<std::uint64_t> parse_option_size(std::string_view key, std::string_view value) {
    std::uint64_t number = 0;
    auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), number);
    std::string_view rest(end, value.data() + value.size() - end);
    if (ec != std::errc() || end == value.data())
        return bad_option(fmt::format("option {}: '{}' is not a size", key, value));
    unsigned shift = 0;
    if (!rest.empty()) {
        static constexpr std::string_view suffixes = "bkmgtpe";
        const auto at = suffixes.find(static_cast<char>(std::tolower(rest[0])));
        if (at == std::string_view::npos || rest.size() > 1)
            return bad_option(fmt::format("option {}: '{}' is not a size", key, value));
        shift = static_cast<unsigned>(at) * 10;
    }
    if (shift && number > (UINT64_MAX >> shift))
        return bad_option(fmt::format("option {}: '{}' is too large", key, value));
    return number << shift;
}

Error io_failure(const std::filesystem::path& path, std::string_view what, int err) {
    return detail::errno_error(
        err, fmt::format("{}: cannot {}: {}", path.string(), what, std::strerror(err)));
}

Result<void> write_all(int fd, const std::byte* data, std::size_t length, std::uint64_t offset,
                       const std::filesystem::path& path) {
    const detail::Transfer written = detail::pwrite_full(fd, data, length, offset);
    if (written.done < length)
        return io_failure(path, "write", detail::transfer_errno(written));
    return {};
}

std::filesystem::path relative_to(const std::filesystem::path& image, const std::string& name) {
    std::filesystem::path named(name);
    return named.is_absolute() ? named : image.parent_path() / named;
}

} // namespace

Result<void> parse_create_options(std::string_view text, CreateOptions& options) {
    std::size_t at = 0;
    while (at < text.size()) {
        // Options are separated by ','; ",," stands for a comma inside a value (qemu's
        // QemuOpts syntax).
        std::string item;
        while (at < text.size()) {
            if (text[at] == ',') {
                if (at + 1 < text.size() && text[at + 1] == ',') {
                    item += ',';
                    at += 2;
                    continue;
                }
                ++at;
                break;
            }
            item += text[at++];
        }
        if (item.empty())
            continue;
        const auto eq = item.find('=');
        const std::string key = item.substr(0, eq);
        const std::string value = eq == std::string::npos ? std::string() : item.substr(eq + 1);
        if (key == "compat") {
            if (value == "0.10" || value == "v2")
                options.version = 2;
            else if (value == "1.1" || value == "v3")
                options.version = 3;
            else
                return bad_option(fmt::format("option compat: '{}' is not 0.10 or 1.1", value));
        } else if (key == "cluster_size") {
            auto size = parse_option_size(key, value);
            if (!size)
                return std::move(size).error();
            if (*size > UINT32_MAX)
                return bad_option(fmt::format("option cluster_size: {} is too large", value));
            options.cluster_size = static_cast<std::uint32_t>(*size);
        } else if (key == "extended_l2" || key == "lazy_refcounts" || key == "data_file_raw") {
            auto flag = parse_bool(key, value);
            if (!flag)
                return std::move(flag).error();
            (key == "extended_l2"      ? options.extended_l2
             : key == "lazy_refcounts" ? options.lazy_refcounts
                                       : options.data_file_raw) = *flag;
        } else if (key == "compression_type") {
            if (value == "zlib")
                options.compression_type = CompressionType::zlib;
            else if (value == "zstd")
                options.compression_type = CompressionType::zstd;
            else
                return bad_option(
                    fmt::format("option compression_type: '{}' is not zlib or zstd", value));
        } else if (key == "refcount_bits") {
            unsigned bits = 0;
            auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), bits);
            if (ec != std::errc() || end != value.data() + value.size())
                return bad_option(fmt::format("option refcount_bits: '{}' is not a number", value));
            options.refcount_bits = bits;
        } else if (key == "backing_file") {
            options.backing_file = value;
        } else if (key == "backing_fmt") {
            options.backing_format = value;
        } else if (key == "data_file") {
            options.data_file = value;
        } else if (key == "preallocation") {
            if (value != "off")
                return bad_option(
                    fmt::format("option preallocation={} is not supported (off is)", value));
        } else {
            return bad_option(fmt::format("unknown or unsupported option '{}' (compat, "
                                          "cluster_size, extended_l2, compression_type, "
                                          "refcount_bits, lazy_refcounts, backing_file, "
                                          "backing_fmt, data_file, data_file_raw, preallocation)",
                                          key));
        }
    }
    return {};
}

Result<void> create(const std::filesystem::path& path, std::uint64_t size,
                    const CreateOptions& options) {
    if (options.version != 2 && options.version != 3)
        return bad_option(fmt::format("compat: version {} (2 or 3)", options.version));
    if (options.data_file_raw && !options.data_file)
        return bad_option("data_file_raw needs data_file (qemu: data-file-raw requires a data "
                          "file)");
    if (options.data_file && options.backing_file && options.data_file_raw)
        return bad_option("a raw external data file cannot have a backing file");
    if (options.backing_format && *options.backing_format != "qcow2" &&
        *options.backing_format != "raw") {
        return bad_option(fmt::format("backing format '{}' is not supported (qcow2 or raw)",
                                      detail::printable(*options.backing_format)));
    }
    HeaderFields fields;
    fields.compression_type = options.compression_type;
    fields.backing_file = options.backing_file;
    fields.backing_format = options.backing_format;
    fields.version = options.version;
    fields.lazy_refcounts = options.lazy_refcounts;
    fields.data_file = options.data_file;
    fields.data_file_raw = options.data_file_raw;
    if (options.backing_file) {
        // The backing file must open (qemu-img create checks it unless -u), and gives the size
        // when none is asked for.
        const std::filesystem::path backing = relative_to(path, *options.backing_file);
        if (!fields.backing_format) {
            auto probed = probe_format(backing);
            if (!probed)
                return std::move(probed).error();
            fields.backing_format = *probed;
        }
        OpenOptions open;
        open.format = fields.backing_format;
        auto below = Image::open(backing, open);
        if (!below) {
            Error error = std::move(below).error();
            error.message = fmt::format("backing file {}: {}", backing.string(), error.message);
            error.message_names_path = false;
            return error;
        }
        if (size == 0)
            size = below->size();
    }
    // qemu rounds the size up to whole sectors (qcow2_co_create_opts).
    if (size > UINT64_MAX - 511)
        return bad_option(fmt::format("size {} is too large", size));
    size = (size + 511) & ~std::uint64_t{511};
    if (size > static_cast<std::uint64_t>(INT64_MAX))
        return bad_option(fmt::format("size {} is too large", size));

    WriteOptions geometry_options;
    geometry_options.cluster_size = options.cluster_size;
    geometry_options.extended_l2 = options.extended_l2;
    geometry_options.refcount_bits = options.refcount_bits;
    auto geometry = make_geometry(geometry_options, size);
    if (!geometry)
        return std::move(geometry).error();
    const Geometry& g = *geometry;
    // data_file_raw: every cluster allocated at its guest offset (qemu forces
    // preallocation=metadata: "cannot have unallocated clusters in raw data file mode").
    const std::uint64_t l2_tables = options.data_file_raw ? g.l1_size() : 0;
    auto layout = make_layout(g, l2_tables, 0);
    if (!layout)
        return std::move(layout).error();
    auto header = encode_header(g, *layout, fields);
    if (!header)
        return std::move(header).error();

    std::vector<std::byte> image(layout->total() << g.cluster_bits);
    std::copy(header->begin(), header->end(), image.begin());
    const std::uint64_t cs = g.cluster_size;
    for (std::uint64_t i = 0; i < layout->refblock_count; ++i) {
        detail::store_be64(image.data() + (layout->reftable << g.cluster_bits) +
                               i * detail::kRefcountTableEntrySize,
                           (layout->refblocks + i) << g.cluster_bits);
    }
    for (std::uint64_t c = 0; c < layout->total(); ++c) {
        const std::uint64_t block = c / g.refs_per_block();
        detail::set_refcount_entry(image.data() + ((layout->refblocks + block) << g.cluster_bits),
                                   c % g.refs_per_block(), 1, g.refcount_order);
    }
    for (std::uint64_t t = 0; t < l2_tables; ++t) {
        const std::uint64_t l2 = (layout->l2 + t) << g.cluster_bits;
        detail::encode_l1(image.data() + (layout->l1 << g.cluster_bits) + t * 8, l2,
                          /*copied=*/true);
        std::span<std::byte> table(image.data() + l2, cs);
        for (std::uint64_t i = 0; i < g.l2_entries(); ++i) {
            const std::uint64_t guest = t * g.l2_entries() + i;
            if (guest >= g.guest_clusters())
                break;
            L2Plan entry;
            entry.kind = L2Plan::Kind::data;
            entry.host = guest << g.cluster_bits;
            encode_l2_entry(g, table, i, entry);
        }
    }

    if (!options.replace && std::filesystem::exists(path))
        return Error{ErrorCode::io_error, fmt::format("{}: already exists", path.string())};
    const std::filesystem::path temporary =
        path.parent_path() / fmt::format(".{}.{}.tmp", path.filename().string(), ::getpid());
    int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return io_failure(temporary, "create", errno);
    auto written = write_all(fd, image.data(), image.size(), 0, temporary);
    if (written && ::fsync(fd) != 0)
        written = io_failure(temporary, "sync", errno);
    ::close(fd);
    if (!written) {
        std::filesystem::remove(temporary);
        return written;
    }
    if (options.data_file) {
        // Created (or emptied) with the disk's size, as qemu-img create does.
        const std::filesystem::path data = relative_to(path, *options.data_file);
        int data_fd = ::open(data.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (data_fd < 0 || ::ftruncate(data_fd, 0) != 0 ||
            ::ftruncate(data_fd, static_cast<off_t>(size)) != 0 || ::fsync(data_fd) != 0) {
            const int err = errno;
            if (data_fd >= 0)
                ::close(data_fd);
            std::filesystem::remove(temporary);
            return io_failure(data, "create the data file", err);
        }
        ::close(data_fd);
    }
    if (::rename(temporary.c_str(), path.c_str()) != 0) {
        const int err = errno;
        std::filesystem::remove(temporary);
        return io_failure(path, "rename the new image into place", err);
    }
    // The rename itself survives a crash once the directory is synced.
    int dir = ::open(path.parent_path().empty() ? "." : path.parent_path().c_str(),
                     O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
        ::fsync(dir);
        ::close(dir);
    }
    return {};
}

} // namespace qcowmap
