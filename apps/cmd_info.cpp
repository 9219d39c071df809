// qcowmap info: what the header says, like `qemu-img info`.
#include "cli.hpp"

#include <qcowmap/references.hpp>

#include <fmt/format.h>

#include <ctime>
#include <sys/stat.h>

namespace qcowmap::cli {
namespace {

struct FeatureList {
    std::vector<std::string> incompatible, compatible, autoclear;
};

FeatureList named_features(const ImageInfo& info) {
    FeatureList list;
    auto collect = [&](std::uint64_t mask, FeatureName::Type type, std::vector<std::string>& out) {
        for (unsigned bit = 0; bit < 64; ++bit) {
            if (mask & (std::uint64_t{1} << bit)) {
                out.push_back(info.feature_name(type, bit));
            }
        }
    };
    collect(info.incompatible_features, FeatureName::Type::incompatible, list.incompatible);
    collect(info.compatible_features, FeatureName::Type::compatible, list.compatible);
    collect(info.autoclear_features, FeatureName::Type::autoclear, list.autoclear);
    return list;
}

std::string extension_name(std::uint32_t type) {
    switch (type) {
    case 0xe2792aca:
        return "backing file format";
    case 0x6803f857:
        return "feature name table";
    case 0x23852875:
        return "bitmaps";
    case 0x0537be77:
        return "full disk encryption header";
    case 0x44415441:
        return "external data file";
    default:
        return fmt::format("unknown ({:#010x})", type);
    }
}

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

std::uint64_t disk_usage(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? static_cast<std::uint64_t>(st.st_blocks) * 512 : 0;
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

/// Like qemu-img info's format-specific "bitmaps": name, granularity, flags; plus whether the
/// bitmap can be trusted.
std::string json_bitmaps(const ImageInfo& info) {
    if (!info.bitmaps || info.bitmaps->entries.empty())
        return "[]";
    std::string out = "[";
    for (std::size_t i = 0; i < info.bitmaps->entries.size(); ++i) {
        const BitmapEntry& e = info.bitmaps->entries[i];
        std::vector<std::string> flags;
        if (e.in_use())
            flags.emplace_back("in-use");
        if (e.enabled())
            flags.emplace_back("auto");
        if (e.flags & kBitmapExtraDataCompatible)
            flags.emplace_back("extra-data-compatible");
        out += fmt::format("{}\n        {{ \"name\": {}, \"granularity\": {}, \"flags\": {}, "
                           "\"consistent\": {}, \"inconsistent-reason\": {} }}",
                           i ? "," : "", json_string(e.name), e.granularity(), json_list(flags),
                           e.consistent(),
                           e.consistent() ? "null" : json_string(e.inconsistent_reason));
    }
    return out + "\n    ]";
}

/// The references an image names and whether --untrusted would follow each.
std::string json_references(const std::vector<ImageReference>& references) {
    if (references.empty())
        return "[]";
    std::string out = "[";
    for (std::size_t i = 0; i < references.size(); ++i) {
        const ImageReference& r = references[i];
        out += fmt::format(
            "{}\n        {{ \"kind\": \"{}\", \"name\": {}, \"untrusted-allowed\": "
            "{}, \"untrusted-refusal\": {}, \"missing\": {} }}",
            i ? "," : "",
            r.kind == ImageReference::Kind::backing_file ? "backing-file" : "data-file",
            json_string(r.name), r.untrusted_refusal.empty(),
            r.untrusted_refusal.empty() ? "null" : json_string(r.untrusted_refusal), r.missing);
    }
    return out + "\n    ]";
}

std::string json_object(const std::string& path, const ImageInfo& info,
                        const std::vector<ImageReference>& references) {
    std::string o = "{\n";
    auto field = [&](std::string_view key, const std::string& value) {
        o += fmt::format("    \"{}\": {},\n", key, value);
    };
    field("filename", json_string(path));
    field("format", info.version == 1 ? "\"qcow\"" : "\"qcow2\"");
    field("version", std::to_string(info.version));
    field("virtual-size", std::to_string(info.virtual_size));
    field("actual-size", std::to_string(disk_usage(path)));
    field("file-size", std::to_string(info.file_size));
    field("cluster-size", std::to_string(info.cluster_size));
    field("refcount-bits", info.version == 1 ? "null" : std::to_string(info.refcount_bits()));
    field("compression-type",
          info.compression_type == CompressionType::zstd ? "\"zstd\"" : "\"zlib\"");
    field("extended-l2", info.extended_l2 ? "true" : "false");
    field("lazy-refcounts", (info.compatible_features & kCompatLazyRefcounts) ? "true" : "false");
    field("dirty", (info.incompatible_features & kIncompatDirty) ? "true" : "false");
    field("corrupt", (info.incompatible_features & kIncompatCorrupt) ? "true" : "false");
    FeatureList features = named_features(info);
    field("incompatible-features", json_list(features.incompatible));
    field("compatible-features", json_list(features.compatible));
    field("autoclear-features", json_list(features.autoclear));
    std::vector<std::string> extensions;
    for (const HeaderExtension& e : info.extensions) {
        extensions.push_back(extension_name(e.type));
    }
    field("header-extensions", json_list(extensions));
    field("backing-filename", json_optional(info.backing_file));
    field("backing-filename-format", json_optional(info.backing_format));
    field("data-file", json_optional(info.data_file));
    field("data-file-raw", (info.autoclear_features & kAutoclearDataFileRaw) ? "true" : "false");
    field("snapshot-count", std::to_string(info.snapshot_count));
    field("snapshots", json_snapshots(info.snapshots));
    field("bitmaps", json_bitmaps(info));
    o += fmt::format("    \"references\": {}\n}}", json_references(references));
    return o;
}

std::string json_raw_object(const LayerInfo& layer) {
    return fmt::format(
        "{{\n    \"filename\": {},\n    \"format\": \"raw\",\n    \"virtual-size\": {},\n"
        "    \"actual-size\": {}\n}}",
        json_string(layer.path.string()), layer.virtual_size, disk_usage(layer.path.string()));
}

/// qemu-img's snapshot table (block/qapi.c bdrv_snapshot_dump), dates in local time.
void print_snapshot_table(const std::vector<Snapshot>& snapshots) {
    fmt::print("Snapshot list:\n");
    fmt::print("{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
               "ICOUNT");
    for (const Snapshot& sn : snapshots) {
        std::time_t when = sn.date_seconds;
        std::tm local{};
        ::localtime_r(&when, &local);
        char date[32];
        std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &local);
        std::uint64_t secs = sn.vm_clock_nanoseconds / 1000000000;
        std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60,
                                        secs % 60, (sn.vm_clock_nanoseconds / 1000000) % 1000);
        fmt::print("{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n", printable(sn.id), printable(sn.name),
                   human_size(sn.vm_state_size), date, clock,
                   sn.icount ? std::to_string(*sn.icount) : std::string());
    }
}

std::string joined(const std::vector<std::string>& items) {
    if (items.empty())
        return "none";
    std::string out;
    for (std::size_t i = 0; i < items.size(); ++i)
        out += (i ? ", " : "") + printable(items[i]);
    return out;
}

void print_human(const std::string& path, const ImageInfo& info,
                 const std::vector<ImageReference>& references) {
    FeatureList features = named_features(info);
    fmt::print("image: {}\n", path);
    fmt::print("file format: {}\n", info.version == 1 ? "qcow" : "qcow2");
    fmt::print("version: {}{}\n", info.version,
               info.version == 2   ? " (compat 0.10)"
               : info.version == 3 ? " (compat 1.1)"
                                   : "");
    fmt::print("virtual size: {} ({} bytes)\n", human_size(info.virtual_size), info.virtual_size);
    fmt::print("disk size: {}\n", human_size(disk_usage(path)));
    fmt::print("file size: {} bytes\n", info.file_size);
    fmt::print("cluster_size: {}\n", info.cluster_size);
    if (info.backing_file) {
        fmt::print("backing file: {}\n", printable(*info.backing_file));
        if (info.backing_format)
            fmt::print("backing file format: {}\n", printable(*info.backing_format));
    }
    if (info.data_file)
        fmt::print("data file: {}\n", printable(*info.data_file));
    for (const ImageReference& r : references) {
        fmt::print("untrusted: {} '{}' {}\n", to_string(r.kind), printable(r.name),
                   r.missing                     ? std::string("is missing")
                   : r.untrusted_refusal.empty() ? std::string("would be followed")
                                                 : "would be refused: " + r.untrusted_refusal);
    }
    if (info.version != 1)
        fmt::print("refcount bits: {}\n", info.refcount_bits());
    fmt::print("compression type: {}\n",
               info.compression_type == CompressionType::zstd ? "zstd" : "zlib");
    fmt::print("extended l2: {}\n", info.extended_l2);
    fmt::print("dirty: {}\n", (info.incompatible_features & kIncompatDirty) != 0);
    fmt::print("corrupt: {}\n", (info.incompatible_features & kIncompatCorrupt) != 0);
    fmt::print("incompatible features: {}\n", joined(features.incompatible));
    fmt::print("compatible features: {}\n", joined(features.compatible));
    fmt::print("autoclear features: {}\n", joined(features.autoclear));
    std::vector<std::string> extensions;
    for (const HeaderExtension& e : info.extensions)
        extensions.push_back(extension_name(e.type));
    fmt::print("header extensions: {}\n", joined(extensions));
    if (!info.bitmaps || info.bitmaps->entries.empty()) {
        fmt::print("bitmaps: none{}\n",
                   info.bitmaps && !info.bitmaps->directory_error.empty()
                       ? " (stale bitmaps extension: " + info.bitmaps->directory_error + ")"
                       : std::string());
    } else {
        fmt::print("bitmaps:\n");
        for (const BitmapEntry& e : info.bitmaps->entries) {
            fmt::print("    {}\n", describe_bitmap(e));
        }
    }
    fmt::print("snapshots: {}\n", info.snapshot_count);
    if (!info.snapshots.empty()) {
        print_snapshot_table(info.snapshots);
    }
}

void print_raw_human(const LayerInfo& layer) {
    fmt::print("image: {}\n", layer.path.string());
    fmt::print("file format: raw\n");
    fmt::print("virtual size: {} ({} bytes)\n", human_size(layer.virtual_size), layer.virtual_size);
    fmt::print("disk size: {}\n", human_size(disk_usage(layer.path.string())));
}

} // namespace

Command add_info(CLI::App& app) {
    auto* command =
        app.add_subcommand("info", "Show what the image header says (like qemu-img info)");
    auto args = std::make_shared<ImageArgs>();
    auto json = std::make_shared<bool>(false);
    auto chain = std::make_shared<bool>(false);
    args->add_to(*command, /*contents=*/false);
    command->add_flag("--json", *json, "Print a JSON object (an array with --backing-chain)");
    command->add_flag("--backing-chain", *chain,
                      "Describe every layer of the backing chain, top first");
    return {command, [args, json, chain] {
                std::vector<LayerInfo> layers;
                if (*chain && args->backing != "none") {
                    // Open the whole chain once: this checks it (loops, missing files) and
                    // resolves every layer's path as reads would.
                    auto image = open_or_report(*args);
                    if (!image)
                        return static_cast<int>(kExitImageError);
                    layers = image->layers();
                } else {
                    layers.push_back({args->path, "qcow2", 0});
                }
                std::string out;
                for (std::size_t i = 0; i < layers.size(); ++i) {
                    const LayerInfo& layer = layers[i];
                    if (layer.format == "raw") {
                        if (*json)
                            out += (i ? ",\n" : "") + json_raw_object(layer);
                        else {
                            if (i)
                                fmt::print("\n");
                            print_raw_human(layer);
                        }
                        continue;
                    }
                    // Each qcow2 layer describes itself: its backing file is named, not opened.
                    ImageArgs one = *args;
                    one.path = layer.path.string();
                    one.backing = "none";
                    auto image = open_or_report(one);
                    if (!image)
                        return static_cast<int>(kExitImageError);
                    if (*json) {
                        out += (i ? ",\n" : "") +
                               json_object(one.path, image->info(), image_references(*image));
                    } else {
                        if (i)
                            fmt::print("\n");
                        print_human(one.path, image->info(), image_references(*image));
                    }
                }
                if (*json) {
                    fmt::print("{}\n", *chain ? "[" + out + "]" : out);
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli
