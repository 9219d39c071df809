// qcowmap info: what the header says, like `qemu-img info`.
#include "cli.hpp"

#include <fmt/format.h>

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
    case 0xe2792aca: return "backing file format";
    case 0x6803f857: return "feature name table";
    case 0x23852875: return "bitmaps";
    case 0x0537be77: return "full disk encryption header";
    case 0x44415441: return "external data file";
    default: return fmt::format("unknown ({:#010x})", type);
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

void print_json(const std::string& path, const ImageInfo& info) {
    FeatureList features = named_features(info);
    std::vector<std::string> extensions;
    for (const HeaderExtension& e : info.extensions) {
        extensions.push_back(extension_name(e.type));
    }
    std::vector<std::string> bitmaps = info.bitmaps ? info.bitmaps->names : std::vector<std::string>{};
    fmt::print("{{\n");
    fmt::print("    \"filename\": {},\n", json_string(path));
    fmt::print("    \"format\": \"{}\",\n", info.version == 1 ? "qcow" : "qcow2");
    fmt::print("    \"version\": {},\n", info.version);
    fmt::print("    \"virtual-size\": {},\n", info.virtual_size);
    fmt::print("    \"actual-size\": {},\n", disk_usage(path));
    fmt::print("    \"file-size\": {},\n", info.file_size);
    fmt::print("    \"cluster-size\": {},\n", info.cluster_size);
    if (info.version == 1) {
        fmt::print("    \"refcount-bits\": null,\n");
    } else {
        fmt::print("    \"refcount-bits\": {},\n", info.refcount_bits());
    }
    fmt::print("    \"compression-type\": \"{}\",\n",
               info.compression_type == CompressionType::zstd ? "zstd" : "zlib");
    fmt::print("    \"extended-l2\": {},\n", info.extended_l2);
    fmt::print("    \"lazy-refcounts\": {},\n", (info.compatible_features & kCompatLazyRefcounts) != 0);
    fmt::print("    \"dirty\": {},\n", (info.incompatible_features & kIncompatDirty) != 0);
    fmt::print("    \"corrupt\": {},\n", (info.incompatible_features & kIncompatCorrupt) != 0);
    fmt::print("    \"incompatible-features\": {},\n", json_list(features.incompatible));
    fmt::print("    \"compatible-features\": {},\n", json_list(features.compatible));
    fmt::print("    \"autoclear-features\": {},\n", json_list(features.autoclear));
    fmt::print("    \"header-extensions\": {},\n", json_list(extensions));
    fmt::print("    \"backing-filename\": {},\n", json_optional(info.backing_file));
    fmt::print("    \"backing-filename-format\": {},\n", json_optional(info.backing_format));
    fmt::print("    \"data-file\": {},\n", json_optional(info.data_file));
    fmt::print("    \"snapshot-count\": {},\n", info.snapshot_count);
    fmt::print("    \"bitmaps\": {}\n", json_list(bitmaps));
    fmt::print("}}\n");
}

std::string joined(const std::vector<std::string>& items) {
    if (items.empty()) return "none";
    std::string out;
    for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
    return out;
}

void print_human(const std::string& path, const ImageInfo& info) {
    FeatureList features = named_features(info);
    fmt::print("image: {}\n", path);
    fmt::print("file format: {}\n", info.version == 1 ? "qcow" : "qcow2");
    fmt::print("version: {}{}\n", info.version,
               info.version == 2 ? " (compat 0.10)" : info.version == 3 ? " (compat 1.1)" : "");
    fmt::print("virtual size: {} ({} bytes)\n", human_size(info.virtual_size), info.virtual_size);
    fmt::print("disk size: {}\n", human_size(disk_usage(path)));
    fmt::print("file size: {} bytes\n", info.file_size);
    fmt::print("cluster_size: {}\n", info.cluster_size);
    if (info.backing_file) {
        fmt::print("backing file: {}\n", *info.backing_file);
        if (info.backing_format) fmt::print("backing file format: {}\n", *info.backing_format);
    }
    if (info.data_file) fmt::print("data file: {}\n", *info.data_file);
    if (info.version != 1) fmt::print("refcount bits: {}\n", info.refcount_bits());
    fmt::print("compression type: {}\n",
               info.compression_type == CompressionType::zstd ? "zstd" : "zlib");
    fmt::print("extended l2: {}\n", info.extended_l2);
    fmt::print("dirty: {}\n", (info.incompatible_features & kIncompatDirty) != 0);
    fmt::print("corrupt: {}\n", (info.incompatible_features & kIncompatCorrupt) != 0);
    fmt::print("incompatible features: {}\n", joined(features.incompatible));
    fmt::print("compatible features: {}\n", joined(features.compatible));
    fmt::print("autoclear features: {}\n", joined(features.autoclear));
    std::vector<std::string> extensions;
    for (const HeaderExtension& e : info.extensions) extensions.push_back(extension_name(e.type));
    fmt::print("header extensions: {}\n", joined(extensions));
    fmt::print("snapshots: {}\n", info.snapshot_count);
    fmt::print("bitmaps: {}\n", info.bitmaps ? joined(info.bitmaps->names) : "none");
}

} // namespace

Command add_info(CLI::App& app) {
    auto* command = app.add_subcommand("info", "Show what the image header says (like qemu-img info)");
    auto args = std::make_shared<ImageArgs>();
    auto json = std::make_shared<bool>(false);
    args->add_to(*command);
    command->add_flag("--json", *json, "Print a JSON object instead of text");
    return {command, [args, json] {
                // info describes the top image: its backing file is named, not opened.
                ImageArgs top = *args;
                top.backing = "none";
                auto image = open_or_report(top);
                if (!image) return static_cast<int>(kExitImageError);
                if (*json) {
                    print_json(args->path, image->info());
                } else {
                    print_human(args->path, image->info());
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli
