// qcowmap — the files an image names (backing file, external data file) and whether an
// untrusted open would follow them.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace qcowmap {

/// Every message refusing a reference because of OpenOptions::untrusted ends with this.
inline constexpr std::string_view kUntrustedRefusalMark = " (untrusted)";

/// A file named in an image's header.
struct ImageReference {
    enum class Kind : std::uint8_t { backing_file, data_file };
    Kind kind = Kind::backing_file;
    /// The name as stored in the image.
    std::string name;
    /// Empty when an open with OpenOptions::untrusted would follow the reference; else why it
    /// would be refused ("leaves the image's directory", "is an absolute path", "is a FIFO, not
    /// a regular file"...). A file that does not exist is not refused for being untrusted:
    /// opening it fails either way, so `missing` says that instead.
    std::string untrusted_refusal;
    /// True when the named file does not exist (or cannot be opened at all).
    bool missing = false;
};

/// "backing file" or "data file".
std::string_view to_string(ImageReference::Kind kind);

/// The backing file and external data file named by the header of `image` (its top layer),
/// each checked the way OpenOptions::untrusted checks it: resolved from the directory of
/// `image.path()` and opened read-only, then closed again. Images opened from memory have no
/// directory: their references are resolved from the current directory.
std::vector<ImageReference> image_references(const Image& image);

} // namespace qcowmap
