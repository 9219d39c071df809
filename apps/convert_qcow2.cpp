// qcowmap convert -O qcow2: options in qemu-img's spelling, then the library's writer.
#include "convert_qcow2.hpp"

#include <qcowmap/writer.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <unistd.h>

namespace qcowmap::cli {

namespace {

/// "qcow2" when the file starts with the qcow magic ("QFI\xfb", versions 1-3), else "raw", as
/// qemu-img probes.
std::string probe_format(const std::string& path) {
    unsigned char magic[4] = {};
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return "qcow2"; // let open() name the problem
    ssize_t n = ::read(fd, magic, sizeof magic);
    ::close(fd);
    const bool qcow =
        n == 4 && magic[0] == 'Q' && magic[1] == 'F' && magic[2] == 'I' && magic[3] == 0xfb;
    return qcow ? "qcow2" : "raw";
}

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

} // namespace

std::shared_ptr<Qcow2ConvertArgs> add_qcow2_options(CLI::App& command) {
    auto args = std::make_shared<Qcow2ConvertArgs>();
    command.add_flag("-c", args->compress,
                     "-O qcow2: store data clusters compressed (zlib, or zstd with "
                     "-o compression_type=zstd), on every core");
    command.add_option("-o", args->create_opts,
                       "-O qcow2: cluster_size=512..2M, compression_type=zlib|zstd, "
                       "extended_l2=on|off, refcount_bits=1..64 (comma-separated)");
    command.add_option("-B", args->backing,
                       "-O qcow2: name BACKING as the output's backing file (stored as given) "
                       "and write only the source's top layer, or with --bitmap its dirty "
                       "ranges: an incremental image");
    command.add_option("-F", args->backing_format, "-O qcow2: format of BACKING: qcow2 or raw");
    return args;
}

bool qcow2_options_given(const Qcow2ConvertArgs& args) {
    return args.compress || !args.create_opts.empty() || !args.backing.empty() ||
           !args.backing_format.empty();
}

int convert_qcow2(const ImageArgs& source, const Qcow2ConvertArgs& args, const std::string& bitmap,
                  const std::string& target, bool force, bool progress) {
    WriteOptions options;
    options.compress = args.compress;
    for (const std::string& text : args.create_opts) {
        if (std::string why = apply_create_options(text, options); !why.empty())
            return report(source.path, why, kExitUsage);
    }
    if (!args.backing.empty())
        options.backing_file = args.backing;
    if (!args.backing_format.empty())
        options.backing_format = args.backing_format;
    if (options.backing_file && !options.backing_format) {
        return report(source.path,
                      "-B needs -F qcow2|raw, the backing file's format (as qemu-img does)",
                      kExitUsage);
    }
    if (options.backing_format && !options.backing_file)
        return report(source.path, "-F without -B", kExitUsage);
    if (!bitmap.empty()) {
        if (!options.backing_file) {
            return report(source.path,
                          "--bitmap with -O qcow2 needs -B BACKING -F FMT: the image holds "
                          "only the dirty clusters, over the previous backup",
                          kExitUsage);
        }
        options.selection = WriteSelection::bitmap_dirty;
        options.bitmap = bitmap;
    } else if (options.backing_file) {
        options.selection = WriteSelection::top_layer;
    }
    if (auto ok = check_write_options(options); !ok)
        return report(source.path, ok.error().message, kExitUsage);

    const bool to_stdout = target == "-";
    if (to_stdout && ::isatty(STDOUT_FILENO)) {
        return report("<stdout>", "is a terminal: refusing to write a qcow2 image to it",
                      kExitOutputError);
    }
    ImageArgs source_args = source;
    OpenOptions open_options = source_args.open_options();
    open_options.format = probe_format(source.path);
    guard_against_shrinking(source.path);
    auto image = Image::open(source.path, open_options);
    if (!image)
        return report(source.path, image.error().message, kExitImageError);

    // Progress in hundredths of a percent of the selected bytes.
    Progress meter(progress, 10000);
    options.threads = worker_threads();
    if (progress) {
        options.progress = [&meter](std::uint64_t done, std::uint64_t total) {
            meter.update(total == 0 ? 10000 : done * 10000 / total);
        };
    }
    auto stats = to_stdout ? write_qcow2(*image, STDOUT_FILENO, options)
                           : write_qcow2_file(*image, target, options, force);
    if (!stats) {
        const Error& error = stats.error();
        if (is_target_error(error)) {
            std::string_view why = error.message;
            why.remove_prefix(kWriteTargetError.size());
            return report(to_stdout ? "<stdout>" : target, why, kExitOutputError);
        }
        return report(source.path, error.message, kExitImageError);
    }
    meter.finish();
    return kExitOk;
}

} // namespace qcowmap::cli
