// The parsers of each on-disk subject that parse_image (header.cpp) calls at open, one file per
// subject as qemu splits block/qcow2*.c: header extensions, the snapshot table, the bitmap
// directory; the L1 table's checks are in cluster.hpp.
#pragma once

#include "image_state.hpp"

#include <cstdint>
#include <optional>
#include <string>

namespace qcowmap::detail {

inline Error header_error(std::string message) {
    return Error{ErrorCode::invalid_header, std::move(message)};
}

/// The header extensions in [start, end) of the first cluster (header_extensions.cpp).
Result<void> parse_extensions(ImageState& state, std::uint64_t start, std::uint64_t end);

/// The name of a feature bit from the image's feature name table, else the name qemu gives it;
/// nullopt for a bit nobody named (header_extensions.cpp).
std::optional<std::string> named_feature(const ImageInfo& info, FeatureName::Type type,
                                         unsigned bit);

/// The snapshot table's entries into `state.info.snapshots` (snapshot.cpp). `zero_fill` (check
/// and salvage): bytes past the end of the file read as zeros, as they do for qemu.
Result<void> parse_snapshot_table(ImageState& state, bool zero_fill);

/// The bitmap directory the bitmaps extension `ext` names, every entry validated
/// (bitmap_directory.cpp).
Result<void> parse_bitmap_directory(const ImageState& state, BitmapsExtension& ext);

} // namespace qcowmap::detail
