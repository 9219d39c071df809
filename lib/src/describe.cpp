// info_json: the header as `qemu-img info --output=json` and qcowmap print it (qemu-img.c
// img_info, block/qapi.c bdrv_image_info_dump, block/qcow2.c qcow2_get_specific_info).
#include "image_state.hpp"

#include <qcowmap/describe.hpp>
#include <qcowmap/format.hpp>
#include <qcowmap/references.hpp>

#include <fmt/format.h>

#include <sys/stat.h>

namespace qcowmap {

std::string json_string(std::string_view text) {
    std::string out = "\"";
    for (char c : text) {
        auto u = static_cast<unsigned char>(c);
        switch (c) {
        case '"':
            out += "\\\"";
            break;
        case '\\':
            out += "\\\\";
            break;
        case '\n':
            out += "\\n";
            break;
        case '\r':
            out += "\\r";
            break;
        case '\t':
            out += "\\t";
            break;
        default:
            if (u < 0x20 || u == 0x7f) {
                out += fmt::format("\\u{:04x}", u);
            } else {
                out += c;
            }
        }
    }
    out += '"';
    return out;
}

namespace {

std::string json_list(const std::vector<std::string>& items) {
    std::string out = "[";
    for (std::size_t i = 0; i < items.size(); ++i) {
        out += (i ? ", " : "") + json_string(items[i]);
    }
    return out + "]";
}

std::string json_optional(const std::optional<std::string>& value) {
    return value ? json_string(*value) : "null";
}

const char* json_bool(bool value) {
    return value ? "true" : "false";
}

/// Bytes the file occupies on its file system (st_blocks), as qemu's "actual-size".
std::uint64_t disk_usage(const detail::ImageState& layer) {
    struct stat st {};
    return layer.fd() >= 0 && ::fstat(layer.fd(), &st) == 0
               ? static_cast<std::uint64_t>(st.st_blocks) * 512
               : 0;
}

std::vector<std::string> feature_names(const ImageInfo& info, std::uint64_t mask,
                                       FeatureName::Type type) {
    std::vector<std::string> out;
    for (unsigned bit = 0; bit < 64; ++bit) {
        if (mask & (std::uint64_t{1} << bit))
            out.push_back(info.feature_name(type, bit));
    }
    return out;
}

std::string json_snapshots(const std::vector<Snapshot>& snapshots) {
    std::string out = "[";
    for (std::size_t i = 0; i < snapshots.size(); ++i) {
        const Snapshot& sn = snapshots[i];
        out += fmt::format(
            "{}\n        {{ \"id\": {}, \"name\": {}, \"vm-state-size\": {}, \"date-sec\": {}, "
            "\"date-nsec\": {}, \"vm-clock-sec\": {}, \"vm-clock-nsec\": {}, \"icount\": {}, "
            "\"virtual-size\": {}, \"l1-size\": {} }}",
            i ? "," : "", json_string(sn.id), json_string(sn.name), sn.vm_state_size,
            sn.date_seconds, sn.date_nanoseconds, sn.vm_clock_nanoseconds / 1000000000,
            sn.vm_clock_nanoseconds % 1000000000,
            sn.icount ? std::to_string(*sn.icount) : std::string("null"), sn.virtual_size,
            sn.l1_size);
    }
    return out + (snapshots.empty() ? "]" : "\n    ]");
}

/// qcowmap's "bitmaps": qemu's name, granularity and flags, plus whether it can be trusted.
std::string json_bitmaps(const ImageInfo& info) {
    if (!info.bitmaps || info.bitmaps->entries.empty())
        return "[]";
    std::string out = "[";
    for (std::size_t i = 0; i < info.bitmaps->entries.size(); ++i) {
        const BitmapEntry& e = info.bitmaps->entries[i];
        out += fmt::format("{}\n        {{ \"name\": {}, \"granularity\": {}, \"flags\": {}, "
                           "\"consistent\": {}, \"inconsistent-reason\": {} }}",
                           i ? "," : "", json_string(e.name), e.granularity(),
                           json_list(bitmap_flag_names(e.flags)), json_bool(e.consistent()),
                           e.consistent() ? "null" : json_string(e.inconsistent_reason));
    }
    return out + "\n    ]";
}

/// qemu's "format-specific" object (QAPI ImageInfoSpecificQCow2): version 2 images carry
/// compat, refcount bits and compression type only; bitmaps and the data-file keys appear only
/// where they apply, as qemu prints them.
std::string json_format_specific(const ImageInfo& info) {
    std::vector<std::pair<std::string, std::string>> data;
    data.emplace_back("compat", info.version == 2 ? "\"0.10\"" : "\"1.1\"");
    data.emplace_back("compression-type",
                      info.compression_type == CompressionType::zstd ? "\"zstd\"" : "\"zlib\"");
    if (info.version >= 3) {
        data.emplace_back("lazy-refcounts",
                          json_bool((info.compatible_features & kCompatLazyRefcounts) != 0));
        if (info.bitmaps && !info.bitmaps->entries.empty()) {
            std::string list = "[";
            for (std::size_t i = 0; i < info.bitmaps->entries.size(); ++i) {
                const BitmapEntry& e = info.bitmaps->entries[i];
                list += fmt::format("{}\n                {{ \"flags\": {}, \"name\": {}, "
                                    "\"granularity\": {} }}",
                                    i ? "," : "", json_list(bitmap_flag_names(e.flags)),
                                    json_string(e.name), e.granularity());
            }
            data.emplace_back("bitmaps", list + "\n            ]");
        }
    }
    data.emplace_back("refcount-bits", std::to_string(info.refcount_bits()));
    if (info.version >= 3) {
        if (info.data_file)
            data.emplace_back("data-file", json_string(*info.data_file));
        if (info.incompatible_features & kIncompatDataFile) {
            data.emplace_back("data-file-raw",
                              json_bool((info.autoclear_features & kAutoclearDataFileRaw) != 0));
        }
        data.emplace_back("corrupt",
                          json_bool((info.incompatible_features & kIncompatCorrupt) != 0));
        data.emplace_back("extended-l2", json_bool(info.extended_l2));
    }
    std::string out = "{\n        \"type\": \"qcow2\",\n        \"data\": {";
    for (std::size_t i = 0; i < data.size(); ++i) {
        out +=
            fmt::format("{}\n            \"{}\": {}", i ? "," : "", data[i].first, data[i].second);
    }
    return out + "\n        }\n    }";
}

std::string raw_object(const detail::ImageState& layer) {
    return fmt::format(
        "{{\n    \"filename\": {},\n    \"format\": \"raw\",\n    \"virtual-size\": {},\n"
        "    \"actual-size\": {},\n    \"dirty-flag\": false\n}}",
        json_string(layer.path.string()), layer.disk_size, disk_usage(layer));
}

/// The files the image names and whether OpenOptions::untrusted would follow each.
std::string json_references(const std::vector<ImageReference>& references) {
    if (references.empty())
        return "[]";
    std::string out = "[";
    for (std::size_t i = 0; i < references.size(); ++i) {
        const ImageReference& r = references[i];
        out +=
            fmt::format("{}\n        {{ \"kind\": \"{}\", \"name\": {}, \"untrusted-allowed\": "
                        "{}, \"untrusted-refusal\": {}, \"missing\": {} }}",
                        i ? "," : "",
                        r.kind == ImageReference::Kind::backing_file ? "backing-file" : "data-file",
                        json_string(r.name), json_bool(r.untrusted_refusal.empty()),
                        r.untrusted_refusal.empty() ? "null" : json_string(r.untrusted_refusal),
                        json_bool(r.missing));
    }
    return out + "\n    ]";
}

} // namespace

std::optional<DataFileStatus> data_file_status(const Image& image) {
    const detail::ImageState& state = detail_state(image);
    if (state.format != detail::LayerFormat::qcow2 || !state.has_data_file())
        return std::nullopt;
    return DataFileStatus{state.data_file_path, state.data_file_error};
}

std::string info_json(const Image& image) {
    const detail::ImageState& state = detail_state(image);
    if (state.format == detail::LayerFormat::raw)
        return raw_object(state);
    const ImageInfo& info = state.info;
    const std::string path = state.path.string();
    std::string o = "{\n";
    auto field = [&](std::string_view key, const std::string& value) {
        o += fmt::format("    \"{}\": {},\n", key, value);
    };
    const bool dirty = (info.incompatible_features & kIncompatDirty) != 0;
    field("filename", json_string(path));
    field("format", info.version == 1 ? "\"qcow\"" : "\"qcow2\"");
    field("version", std::to_string(info.version));
    field("virtual-size", std::to_string(info.virtual_size));
    field("actual-size", std::to_string(disk_usage(state)));
    field("file-size", std::to_string(info.file_size));
    field("cluster-size", std::to_string(info.cluster_size));
    field("refcount-bits", info.version == 1 ? "null" : std::to_string(info.refcount_bits()));
    field("compression-type",
          info.compression_type == CompressionType::zstd ? "\"zstd\"" : "\"zlib\"");
    field("extended-l2", json_bool(info.extended_l2));
    field("lazy-refcounts", json_bool((info.compatible_features & kCompatLazyRefcounts) != 0));
    field("dirty", json_bool(dirty));
    field("dirty-flag", json_bool(dirty));
    field("corrupt", json_bool((info.incompatible_features & kIncompatCorrupt) != 0));
    field("incompatible-features", json_list(feature_names(info, info.incompatible_features,
                                                           FeatureName::Type::incompatible)));
    field("compatible-features",
          json_list(feature_names(info, info.compatible_features, FeatureName::Type::compatible)));
    field("autoclear-features",
          json_list(feature_names(info, info.autoclear_features, FeatureName::Type::autoclear)));
    std::vector<std::string> extensions;
    for (const HeaderExtension& e : info.extensions)
        extensions.push_back(header_extension_name(e.type));
    field("header-extensions", json_list(extensions));
    field("backing-filename", json_optional(info.backing_file));
    std::optional<std::string> full_backing;
    if (info.backing_file) {
        // qemu's bdrv_get_full_backing_filename: relative names against the image's directory.
        std::filesystem::path named(*info.backing_file);
        full_backing = (named.is_absolute() ? named : state.path.parent_path() / named).string();
    }
    field("full-backing-filename", json_optional(full_backing));
    field("backing-filename-format", json_optional(info.backing_format));
    field("data-file", json_optional(info.data_file));
    field("data-file-raw", json_bool((info.autoclear_features & kAutoclearDataFileRaw) != 0));
    field("data-file-found", state.has_data_file() ? json_bool(!state.data_file_error) : "null");
    field("references", json_references(image_references(image)));
    field("snapshot-count", std::to_string(info.snapshot_count));
    field("snapshots", json_snapshots(info.snapshots));
    if (info.version == 1) {
        o += fmt::format("    \"bitmaps\": {}\n}}", json_bitmaps(info));
    } else {
        field("bitmaps", json_bitmaps(info));
        o += fmt::format("    \"format-specific\": {}\n}}", json_format_specific(info));
    }
    return o;
}

} // namespace qcowmap
