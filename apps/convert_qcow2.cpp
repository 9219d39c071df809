// qcowmap convert -O qcow2: options in qemu-img's spelling, then the library's writer
// (qcowmap/writer.hpp). Registers itself as an output format of `convert`.
#include "cli.hpp"

#include <qcowmap/writer.hpp>

#include <fmt/format.h>

#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace qcowmap::cli {

namespace {

/// Applies one `-o` list (`key=value,key=value`, qemu-img's create options) to `options`.
/// Returns an error message, or empty.
std::string apply_create_options(const std::string& text, WriteOptions& options) {
    std::size_t at = 0;
    while (at <= text.size()) {
        std::size_t comma = text.find(',', at);
        if (comma == std::string::npos)
            comma = text.size();
        const std::string item = text.substr(at, comma - at);
        at = comma + 1;
        if (item.empty())
            continue;
        const std::size_t eq = item.find('=');
        const std::string key = item.substr(0, eq);
        const std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
        if (eq == std::string::npos)
            return fmt::format("-o {}: expected KEY=VALUE", printable(item));
        if (key == "cluster_size") {
            auto size = parse_size(value);
            if (!size || *size > UINT32_MAX)
                return fmt::format("-o cluster_size: '{}' is not a size", printable(value));
            options.cluster_size = static_cast<std::uint32_t>(*size);
        } else if (key == "compression_type") {
            if (value == "zlib")
                options.compression_type = CompressionType::zlib;
            else if (value == "zstd")
                options.compression_type = CompressionType::zstd;
            else
                return fmt::format("-o compression_type: '{}' is not zlib or zstd",
                                   printable(value));
        } else if (key == "extended_l2") {
            if (value == "on" || value == "true")
                options.extended_l2 = true;
            else if (value == "off" || value == "false")
                options.extended_l2 = false;
            else
                return fmt::format("-o extended_l2: '{}' is not on or off", printable(value));
        } else if (key == "refcount_bits") {
            auto bits = parse_size(value);
            if (!bits || *bits > 64)
                return fmt::format("-o refcount_bits: '{}' is not a number from 1 to 64",
                                   printable(value));
            options.refcount_bits = static_cast<std::uint32_t>(*bits);
        } else if (key == "backing_file") {
            options.backing_file = value;
        } else if (key == "backing_fmt") {
            options.backing_format = value;
        } else {
            return fmt::format("-o: unknown option '{}' (cluster_size, compression_type, "
                               "extended_l2, refcount_bits, backing_file, backing_fmt)",
                               printable(key));
        }
    }
    return {};
}

/// The options only `convert -O qcow2` takes.
struct Qcow2Args {
    bool compress = false;                ///< -c
    std::vector<std::string> create_opts; ///< -o (may be given more than once)
    std::string backing;                  ///< -B
    std::string backing_format;           ///< -F
    bool unsafe = false;                  ///< -u: BACKING is not opened nor checked
};

Qcow2Args& qcow2_args() {
    static Qcow2Args args;
    return args;
}

void add_qcow2_options(CLI::App& command) {
    Qcow2Args& args = qcow2_args();
    command.add_flag("-c", args.compress,
                     "-O qcow2: store data clusters compressed (zlib, or zstd with "
                     "-o compression_type=zstd), on every core");
    command
        .add_option("-o", args.create_opts,
                    "-O qcow2: cluster_size=512..2M, compression_type=zlib|zstd, "
                    "extended_l2=on|off, refcount_bits=1..64 (comma-separated)")
        ->option_text("OPTIONS");
    command
        .add_option("-B", args.backing,
                    "-O qcow2: name BACKING as the output's backing file (stored as given, "
                    "resolved from the output's directory) and write only what differs from "
                    "it, so that the output reads exactly as SOURCE (a source that is an "
                    "overlay of BACKING: its layers above BACKING); with --bitmap, the dirty "
                    "ranges over the previous backup: an incremental image")
        ->option_text("BACKING");
    command.add_option("-F", args.backing_format, "-O qcow2: format of BACKING: qcow2 or raw")
        ->option_text("FMT");
    command.add_flag("-u", args.unsafe,
                     "-O qcow2 with -B: unsafe, as qemu-img create -u: BACKING is neither "
                     "opened nor checked, and only SOURCE's top layer (or the --bitmap's dirty "
                     "ranges) is written: the output is SOURCE only if BACKING reads as "
                     "SOURCE's own backing chain");
}

std::string qcow2_options_given() {
    const Qcow2Args& args = qcow2_args();
    std::string given;
    auto add = [&](bool present, const char* name) {
        if (present)
            given += (given.empty() ? "" : ", ") + std::string(name);
    };
    add(args.compress, "-c");
    add(!args.create_opts.empty(), "-o");
    add(!args.backing.empty(), "-B");
    add(!args.backing_format.empty(), "-F");
    add(args.unsafe, "-u");
    return given;
}

/// `convert -O qcow2 SOURCE TARGET|-`: the library's writer, with qemu-img's options.
int convert_qcow2(const ConvertJob& job) {
    const Qcow2Args& args = qcow2_args();
    WriteOptions options;
    options.compress = args.compress;
    for (const std::string& text : args.create_opts) {
        if (std::string why = apply_create_options(text, options); !why.empty())
            throw UsageError(why);
    }
    if (!args.backing.empty())
        options.backing_file = args.backing;
    if (!args.backing_format.empty())
        options.backing_format = args.backing_format;
    if (options.backing_file && !options.backing_format)
        throw UsageError("-B needs -F qcow2|raw, the backing file's format (as qemu-img does)");
    if (options.backing_format && !options.backing_file)
        throw UsageError("-F without -B");
    if (args.unsafe && !options.backing_file)
        throw UsageError("-u without -B");
    if (!job.bitmap.empty()) {
        if (!options.backing_file) {
            throw UsageError("--bitmap with -O qcow2 needs -B BACKING -F FMT (a new image of "
                             "only the dirty clusters, over the previous backup), or TARGET an "
                             "existing qcow2 copy to update in place");
        }
        options.selection = WriteSelection::bitmap_dirty;
        options.bitmap = job.bitmap;
    } else if (options.backing_file) {
        options.selection =
            args.unsafe ? WriteSelection::top_layer : WriteSelection::differs_from_backing;
    }
    options.digest = job.digest;
    if (job.digest && options.selection != WriteSelection::whole_disk) {
        throw UsageError("--digest takes the digest of a whole disk written out: not with -B "
                         "(the image holds only part of the disk)");
    }
    if (auto ok = check_write_options(options); !ok)
        throw UsageError(ok.error().message);
    const bool to_stdout = job.target == "-";
    if (options.backing_file && !args.unsafe) {
        // As qemu-img opens it: where the new image will look for it (relative names from the
        // target's directory; from here for standard output).
        OpenOptions open;
        open.force_share = job.source.force_share;
        auto backing = open_output_backing(options, to_stdout ? "" : job.target, open);
        if (!backing) {
            Error error = std::move(backing).error();
            if (error.code == ErrorCode::image_in_use)
                error.message += " (-U reads it anyway)";
            return report(to_stdout ? "<stdout>" : job.target, error.message, kExitImageError);
        }
        struct stat existing {};
        if (!to_stdout && ::stat(job.target.c_str(), &existing) == 0 &&
            backing->maps_file(existing.st_dev, existing.st_ino)) {
            // --force would replace a file the new image then reads through: a chain that
            // loops, or a backing file changed under its overlay.
            return report(job.target,
                          "is BACKING or a layer of BACKING's chain: an image cannot be its own "
                          "backing file",
                          kExitOutputError);
        }
        if (options.selection == WriteSelection::bitmap_dirty &&
            backing->size() != job.image.size()) {
            // The clusters left out read from BACKING: the previous backup of this disk has its
            // size (the library refuses it too; here with the option that insists).
            return report(job.target,
                          fmt::format("backing file {} is {} bytes but the disk is {} bytes: "
                                      "not a backup of this disk (-u writes it anyway)",
                                      printable(args.backing), backing->size(), job.image.size()),
                          kExitImageError);
        }
        options.backing_image = std::move(*backing);
    }

    if (to_stdout && !job.force && ::isatty(STDOUT_FILENO)) {
        return report("<stdout>",
                      "is a terminal: refusing to write a qcow2 image to it (redirect the "
                      "output, or use --force)",
                      kExitOutputError);
    }
    // Progress in hundredths of a percent of the selected bytes.
    Progress meter(job.progress, 10000);
    if (job.progress) {
        options.progress = [&meter](std::uint64_t done, std::uint64_t total) {
            meter.update(total == 0 ? 10000 : done * 10000 / total);
        };
    }
    auto stats = to_stdout ? write_qcow2(job.image, STDOUT_FILENO, options)
                           : write_qcow2_file(job.image, job.target, options, job.force);
    if (!stats) {
        const Error& error = stats.error();
        if (is_target_error(error)) {
            std::string_view why = error.message;
            why.remove_prefix(kWriteTargetError.size());
            return report(to_stdout ? "<stdout>" : job.target, why, kExitOutputError);
        }
        return report_error(job.source.path, error, kExitImageError);
    }
    meter.finish();
    return stats->digest ? deliver_digest(job, *stats->digest) : kExitOk;
}

// Registered before main() runs, from this file alone (see OutputFormat in cli.hpp).
[[maybe_unused]] const bool registered =
    register_output_format({"qcow2", add_qcow2_options, convert_qcow2, qcow2_options_given});

} // namespace

} // namespace qcowmap::cli
