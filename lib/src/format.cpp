// Format probing and header extension names (qemu's block.c find_image_format, qcow2_probe).
#include "errors.hpp"
#include "qcow2_format.hpp"
#include "sys_io.hpp"

#include <qcowmap/format.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace qcowmap {

std::string header_extension_name(std::uint32_t type) {
    for (const detail::ExtensionName& known : detail::kExtensionNames) {
        if (known.type == type)
            return std::string(known.name);
    }
    return fmt::format("unknown ({:#010x})", type);
}

namespace {

/// "PATH: strerror(err)", about the image at `path`.
Error named_failure(const std::filesystem::path& path, int err) {
    Error error = detail::errno_error(
        err, fmt::format("{}: {}", detail::printable(path.string()), std::strerror(err)));
    error.message_names_path = true;
    return detail::attribute(std::move(error), ErrorOrigin::image, path.string());
}

} // namespace

Result<std::string> probe_format(const std::filesystem::path& path) {
    // O_NONBLOCK: a FIFO must not hang the probe (opening it is refused later, with a reason).
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        return named_failure(path, errno);
    }
    std::byte magic[4] = {};
    const detail::Transfer read = detail::pread_full(fd, magic, sizeof magic, 0);
    ::close(fd);
    // Short: the end of the file, a directory (EISDIR), a FIFO (EAGAIN): not qcow2 (opening
    // says what it is).
    if (read.error != 0 && read.error != EISDIR && read.error != EAGAIN)
        return named_failure(path, read.error);
    const bool qcow = read.done == 4 && detail::load_be32(magic) == detail::kQcowMagic;
    return std::string(qcow ? "qcow2" : "raw");
}

} // namespace qcowmap
