// Format probing and header extension names (qemu's block.c find_image_format, qcow2_probe).
#include "errors.hpp"
#include "qcow2_format.hpp"

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
    unsigned char magic[4] = {};
    std::size_t got = 0;
    while (got < sizeof magic) {
        ssize_t n = ::pread(fd, magic + got, sizeof magic - got, static_cast<off_t>(got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EISDIR && errno != EAGAIN) {
            int error = errno;
            ::close(fd);
            return named_failure(path, error);
        }
        if (n <= 0)
            break; // end of file, a directory, a FIFO: not qcow2 (opening says what it is)
        got += static_cast<std::size_t>(n);
    }
    ::close(fd);
    const bool qcow = got == 4 && detail::load_be32(reinterpret_cast<const std::byte*>(magic)) ==
                                      detail::kQcowMagic;
    return std::string(qcow ? "qcow2" : "raw");
}

} // namespace qcowmap
