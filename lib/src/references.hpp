// Opening the files an untrusted image names (its backing file, its external data file) without
// letting the image reach outside its own directory.
#pragma once

#include <qcowmap/result.hpp>

#include <filesystem>
#include <string_view>

namespace qcowmap::detail {

/// A file opened for an untrusted reference: the descriptor (read-only, close-on-exec; the
/// caller owns it) and the path it stands for (the image's directory joined with the name).
struct ConfinedFile {
    int fd = -1;
    std::filesystem::path path;
};

/// How `open_confined` resolves the name.
enum class ConfineMethod {
    automatic, ///< openat2(RESOLVE_BENEATH) when the kernel has it, else the component walk
    walk,      ///< always the component walk (O_NOFOLLOW + readlinkat), for tests
};

/// Opens `name`, which the image at `image` names as its backing or data file (`origin`),
/// the way OpenOptions::untrusted requires: the name must be relative, must stay inside the
/// directory of `image` once `..` and symlinks are resolved, and must name a regular file that
/// is not a /proc or /sys file. The check and the open are one step (openat2 with
/// RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS, or a walk of the components with O_NOFOLLOW from a
/// directory descriptor), so a symlink swapped in after the check cannot lead outside.
///
/// Errors, all with `origin` and the name or path: unsupported_feature with
/// Refusal::untrusted for a refused name, its message ending in kUntrustedRefusalMark
/// ("backing file '../x.raw' leaves the image's directory (untrusted)"); io_error naming the
/// path (and its errno) for a file that does not exist or cannot be opened, as for a trusted
/// name. `origin` (backing or data_file) also gives the message's "backing file"/"data file".
Result<ConfinedFile> open_confined(const std::filesystem::path& image, std::string_view name,
                                   ErrorOrigin origin,
                                   ConfineMethod method = ConfineMethod::automatic);

} // namespace qcowmap::detail
