// Header extensions (spec "Header extensions"; qemu's qcow2_read_extensions): the backing
// file format, the external data file name, the feature name table, the bitmaps extension and
// the encryption header pointer; unknown ones are remembered and skipped. A new extension: its
// type in <qcowmap/format.hpp>, its name, layout and decoder in qcow2_format.hpp, its case in
// parse_extension below.
#include "parsers.hpp"

namespace qcowmap {

std::string ImageInfo::feature_name(FeatureName::Type type, unsigned bit) const {
    return detail::named_feature(*this, type, bit).value_or(fmt::format("bit {}", bit));
}

} // namespace qcowmap

namespace qcowmap::detail {
namespace {

std::string trim_feature_name(Bytes name) {
    auto text = as_text(name);
    return std::string(text.substr(0, text.find('\0')));
}
/// The feature name table: entries of kinds and bits we do not know are for future readers.
Result<void> parse_feature_name_table(ImageInfo& info, Bytes data) {
    if (data.size() % kFeatureNameEntrySize != 0) {
        return header_error(fmt::format("feature name table length {} is not a multiple of {}",
                                        data.size(), kFeatureNameEntrySize));
    }
    for (std::size_t i = 0; i < data.size(); i += kFeatureNameEntrySize) {
        auto entry = data.subspan(i, kFeatureNameEntrySize);
        std::uint8_t kind = load_u8(entry, 0);
        std::uint8_t bit = load_u8(entry, 1);
        if (kind > 2 || bit > 63) {
            continue; // keep what we understand
        }
        info.feature_names.push_back({static_cast<FeatureName::Type>(kind), bit,
                                      trim_feature_name(entry.subspan(2, kFeatureNameLength))});
    }
    return {};
}

/// The bitmaps extension (spec "Bitmaps extension"). With autoclear bit 0 clear it may be stale:
/// its bitmaps are listed as inconsistent, and a directory that no longer parses is remembered
/// as the reason instead of refusing the image (qemu ignores the extension then).
Result<void> parse_bitmaps_extension(ImageState& state, Bytes data) {
    ImageInfo& info = state.info;
    if (data.size() != kBitmapsExtensionSize) {
        return header_error(fmt::format("bitmaps extension has length {} (expected {})",
                                        data.size(), kBitmapsExtensionSize));
    }
    BitmapsExtension ext;
    ext.consistent = (info.autoclear_features & kAutoclearBitmaps) != 0;
    const BitmapsExtensionFields fields = decode_bitmaps_extension(data.data());
    ext.count = fields.nb_bitmaps;
    ext.directory_size = fields.directory_size;
    ext.directory_offset = fields.directory_offset;
    std::optional<Error> problem;
    if (ext.count == 0 || ext.count > kMaxBitmaps) {
        problem = header_error(
            fmt::format("bitmaps extension names {} bitmaps (1..{})", ext.count, kMaxBitmaps));
    } else if (fields.reserved != 0) {
        problem = header_error(fmt::format(
            "bitmaps extension reserved field is {:#x} (must be zero)", fields.reserved));
    } else if (ext.directory_size > kMaxBitmapDirectorySize) {
        problem = header_error(fmt::format("bitmap directory size {:#x} exceeds qemu's limit {:#x}",
                                           ext.directory_size, kMaxBitmapDirectorySize));
    } else if (!is_aligned(ext.directory_offset, state.cluster_size)) {
        problem = header_error(
            fmt::format("bitmap directory offset {:#x} is not aligned to the cluster size {:#x}",
                        ext.directory_offset, state.cluster_size));
    }
    if (problem) {
        if (ext.consistent) {
            return std::move(*problem);
        }
        ext.directory_error = std::move(problem->message);
    }
    info.bitmaps = std::move(ext);
    return {};
}

/// One extension's data: known types are decoded, unknown ones may be safely ignored (spec).
Result<void> parse_extension(ImageState& state, std::uint32_t type, Bytes data) {
    ImageInfo& info = state.info;
    switch (type) {
    case kExtensionBackingFormat:
        if (data.size() > kMaxBackingFormatLength) {
            return header_error(
                fmt::format("backing file format name is {} bytes long (at most {})", data.size(),
                            kMaxBackingFormatLength));
        }
        info.backing_format = std::string(as_text(data));
        return {};
    case kExtensionDataFile:
        info.data_file = std::string(as_text(data));
        return {};
    case kExtensionFeatureNames:
        return parse_feature_name_table(info, data);
    case kExtensionBitmaps:
        return parse_bitmaps_extension(state, data);
    case kExtensionEncryption: {
        if (data.size() != kEncryptionExtensionSize) {
            return header_error(fmt::format("full disk encryption header pointer has length {} "
                                            "(expected {})",
                                            data.size(), kEncryptionExtensionSize));
        }
        const EncryptionExtensionFields fields = decode_encryption_extension(data.data());
        info.encryption_header_offset = fields.offset;
        state.encryption_header_length = fields.length;
        return {};
    }
    default:
        return {};
    }
}

bool is_known_extension(std::uint32_t type) {
    return type == kExtensionBackingFormat || type == kExtensionBitmaps ||
           type == kExtensionEncryption || type == kExtensionDataFile;
}

} // namespace

std::optional<std::string> named_feature(const ImageInfo& info, FeatureName::Type type,
                                         unsigned bit) {
    for (const FeatureName& f : info.feature_names) {
        if (f.type == type && f.bit == bit && !f.name.empty()) {
            return f.name;
        }
    }
    for (const KnownFeature& f : kKnownFeatures) {
        if (f.type == type && f.bit == bit)
            return std::string(f.name);
    }
    return std::nullopt;
}

Result<void> parse_extensions(ImageState& state, std::uint64_t start, std::uint64_t end) {
    ImageInfo& info = state.info;
    std::uint64_t at = start;
    while (at < end) {
        auto head = slice(state.bytes, at, kExtensionHeaderSize, "header extension",
                          ErrorCode::invalid_header);
        if (!head || end - at < kExtensionHeaderSize) {
            return header_error(fmt::format(
                "header extension at {:#x} is cut off (extension area ends at {:#x})", at, end));
        }
        const ExtensionHeader ext = decode_extension_header(head->data());
        at += kExtensionHeaderSize;
        if (ext.type == kExtensionEnd) {
            break;
        }
        if (ext.length > end - at) {
            return header_error(fmt::format("header extension {:#010x} at {:#x} has length {} "
                                            "which runs past the extension area end {:#x}",
                                            ext.type, at - kExtensionHeaderSize, ext.length, end));
        }
        auto data =
            slice(state.bytes, at, ext.length, "header extension data", ErrorCode::invalid_header);
        if (!data) {
            return std::move(data).error();
        }
        // Known extensions appear at most once (spec); unknown ones are only remembered, as
        // qemu does (a linear scan over all of them would make a packed first cluster slow).
        if (is_known_extension(ext.type)) {
            for (const HeaderExtension& seen : info.extensions) {
                if (seen.type == ext.type) {
                    return header_error(
                        fmt::format("header extension {:#010x} appears more than once", ext.type));
                }
            }
        }
        info.extensions.push_back({ext.type, ext.length, at});
        if (auto ok = parse_extension(state, ext.type, *data); !ok) {
            return ok;
        }
        // Each extension's data is padded to a multiple of 8.
        std::uint64_t padded = align_up8(ext.length);
        if (padded > end - at) {
            break;
        }
        at += padded;
    }
    return {};
}

} // namespace qcowmap::detail
