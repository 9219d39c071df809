// Building errors with their fields (qcowmap/result.hpp): origin, path, refusal, errno.
#pragma once

#include <qcowmap/result.hpp>

#include <cstring>
#include <string>
#include <string_view>
#include <utility>

namespace qcowmap::detail {

/// An io_error for a failed system call: `message` (strerror(err) when empty), errno kept.
inline Error errno_error(int err, std::string message = {}) {
    Error error{ErrorCode::io_error, message.empty() ? std::strerror(err) : std::move(message)};
    error.system_errno = err;
    return error;
}

/// `error` with its refusal kind set.
inline Error refusal(Error error, Refusal kind) {
    error.refusal = kind;
    return error;
}

/// "image changed while being read (WHY)": ErrorCode::image_changed.
inline Error image_changed(std::string_view why) {
    return Error{ErrorCode::image_changed,
                 "image changed while being read (" + std::string(why) + ")"};
}

/// `error` said to be about `origin` (`path`, `depth`), unless it already names its origin.
inline Error attribute(Error error, ErrorOrigin origin, std::string path, std::uint32_t depth = 0) {
    if (error.origin == ErrorOrigin::none) {
        error.origin = origin;
        error.path = std::move(path);
        error.depth = depth;
    }
    return error;
}

} // namespace qcowmap::detail
