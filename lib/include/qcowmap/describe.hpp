// qcowmap — an image described for people and scripts: `qcowmap info --output=json` as a value.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>
#include <qcowmap/result.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace qcowmap {

/// The external data file of an opened image (incompatible bit 2).
struct DataFileStatus {
    /// Where it was looked for: the name the image gives, resolved against the image's
    /// directory as qcowmap resolves it, or `OpenOptions::data_file`. Empty when the image
    /// names none and none was given.
    std::filesystem::path path;
    /// Why it is not open; only ever set when the image was opened with
    /// `OpenOptions::require_data_file` false (otherwise `open` fails instead).
    std::optional<Error> error;
    /// True when the file is open and its clusters can be read.
    bool found() const { return !error.has_value(); }
};

/// The top layer's external data file, or nullopt when the image has none.
std::optional<DataFileStatus> data_file_status(const Image& image);

/// One JSON object describing the top layer of `image`, as `qcowmap info --output=json`
/// prints it (4-space indentation, no trailing newline). Its keys are qcowmap's (`filename,
/// format, version, virtual-size, actual-size, file-size, cluster-size, refcount-bits,
/// compression-type, extended-l2, lazy-refcounts, dirty, corrupt, incompatible-features,
/// compatible-features, autoclear-features, header-extensions, backing-filename,
/// backing-filename-format, data-file, data-file-raw, data-file-found, references,
/// snapshot-count, snapshots, bitmaps`; `references` lists `{kind, name, untrusted-allowed,
/// untrusted-refusal, missing}` for the backing and data file the header names, see
/// image_references()) together with those of `qemu-img info --output=json`
/// (`dirty-flag`, `full-backing-filename`, and `format-specific` with its `type` and `data`),
/// so that scripts written for either work. A raw image gives `filename, format,
/// virtual-size, actual-size, dirty-flag`. `filename` is `Image::path()`; the sizes are the
/// header's (an opened snapshot does not change them), and only the top layer is described.
std::string info_json(const Image& image);

/// `text` as a JSON string literal, quotes included: `"` and `\` escaped, control characters
/// as `\n`, `\r`, `\t` or `\u00XX`, other bytes (UTF-8 too) as they are. What info_json and
/// the CLI's JSON outputs use for names that come from images.
std::string json_string(std::string_view text);

} // namespace qcowmap
