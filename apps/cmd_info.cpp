// qcowmap info: what the header says, like `qemu-img info`.
#include "cli.hpp"

#include <qcowmap/describe.hpp>
#include <qcowmap/format.hpp>
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

std::uint64_t disk_usage(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 ? static_cast<std::uint64_t>(st.st_blocks) * 512 : 0;
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

void print_human(const std::string& path, const Image& image) {
    const ImageInfo& info = image.info();
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
        // qemu-img info: the name as stored, and where it resolves (against the directory of
        // the image naming it) when that reads differently.
        const std::filesystem::path named(*info.backing_file);
        const std::string actual =
            named.is_absolute() ? named.string()
                                : (std::filesystem::path(path).parent_path() / named).string();
        fmt::print("backing file: {}{}\n", printable(*info.backing_file),
                   actual == *info.backing_file ? "" : " (actual path: " + printable(actual) + ")");
        if (info.backing_format)
            fmt::print("backing file format: {}\n", printable(*info.backing_format));
    }
    if (auto data = data_file_status(image)) {
        fmt::print("data file: {}\n", printable(info.data_file.value_or("")));
        fmt::print("data file found: {}\n",
                   data->found() ? "yes" : "no (" + printable(data->error->message) + ")");
    }
    // Whether --untrusted would follow the names the image holds: only when it would not
    // (the JSON output lists every reference).
    for (const ImageReference& r : image_references(image)) {
        if (!r.missing && !r.untrusted_refusal.empty()) {
            fmt::print("untrusted: {} '{}' would be refused: {}\n", to_string(r.kind),
                       printable(r.name), r.untrusted_refusal);
        }
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
        extensions.push_back(header_extension_name(e.type));
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

void print_raw_human(const std::string& path, std::uint64_t size) {
    fmt::print("image: {}\n", path);
    fmt::print("file format: raw\n");
    fmt::print("virtual size: {} ({} bytes)\n", human_size(size), size);
    fmt::print("disk size: {}\n", human_size(disk_usage(path)));
}

} // namespace

Command add_info(CLI::App& app) {
    auto* command =
        app.add_subcommand("info", "Show what the image header says (like qemu-img info)");
    auto args = std::make_shared<ImageArgs>();
    auto output = std::make_shared<OutputOption>();
    auto chain = std::make_shared<bool>(false);
    // Only the header is needed: a missing data file is shown, not fatal (as qemu-img info).
    args->require_data_file = false;
    args->add_to(*command, /*data_file=*/true, /*snapshot=*/false);
    output->add_to(*command, "one object (an array with --backing-chain) with qemu-img info's "
                             "keys and more");
    command->add_flag("--backing-chain", *chain,
                      "Describe every layer of the backing chain, top first");
    auto stream = std::make_shared<StreamArgs>();
    stream->add_to(*command);
    return {command, [args, output, chain, stream] {
                const bool json = output->json();
                if (args->path == "-") // read from standard input (apps/stream_input.cpp)
                    return describe_stream(*args, *stream, json, false);
                if (stream->given())
                    throw UsageError("--max-spool, --expect-checksum and --stream-stats need - "
                                     "(standard input) as the image");
                std::vector<LayerInfo> layers;
                if (*chain && args->backing != "none") {
                    // Open the whole chain once: this checks it (loops, missing files) and
                    // resolves every layer's path as reads would.
                    auto image = open_or_report(*args);
                    if (!image)
                        return static_cast<int>(kExitImageError);
                    layers = image->layers();
                } else {
                    layers.push_back({args->path, args->format == "raw" ? "raw" : "", 0});
                }
                std::string out;
                for (std::size_t i = 0; i < layers.size(); ++i) {
                    const LayerInfo& layer = layers[i];
                    // Each layer describes itself: its backing file is named, not opened.
                    ImageArgs one = *args;
                    one.path = layer.path.string();
                    one.backing = "none";
                    if (!layer.format.empty())
                        one.format = layer.format == "raw" ? "raw" : "qcow2"; // as opened
                    if (i > 0)
                        one.data_file.clear(); // --data-file is the top image's
                    auto image = open_or_report(one);
                    if (!image)
                        return static_cast<int>(kExitImageError);
                    const bool raw = image->layers().front().format == "raw";
                    if (json) {
                        out += (i ? ",\n" : "") + info_json(*image);
                        continue;
                    }
                    if (i)
                        fmt::print("\n");
                    if (raw)
                        print_raw_human(one.path, image->size());
                    else
                        print_human(one.path, *image);
                }
                if (json) {
                    fmt::print("{}\n", *chain ? "[" + out + "]" : out);
                }
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli
