// qcowmap create, resize, bitmap, commit, rebase: the image-changing commands of qemu-img, with
// its option names and messages, over the library (writable.hpp, lifecycle.hpp).
#include "cli.hpp"

#include <qcowmap/lifecycle.hpp>
#include <qcowmap/writable.hpp>

#include <fmt/format.h>

#include <cstdio>

namespace qcowmap::cli {
namespace {

/// -f: qemu-img's format option, where only qcow2 can be written.
void require_qcow2(const std::string& format) {
    if (!format.empty() && format != "qcow2") {
        throw UsageError(fmt::format("-f {}: only qcow2 images are written", printable(format)));
    }
}

/// `message` on stdout unless -q (qemu-img prints "Image resized." and the like).
void say(bool quiet, const char* message) {
    if (!quiet)
        std::fputs(message, stdout);
}

} // namespace

Command add_create(CLI::App& app) {
    auto* command = app.add_subcommand(
        "create", "Create an empty qcow2 image (qemu-img create -f qcow2): written under a "
                  "temporary name and renamed into place");
    struct Args {
        std::string format, options, backing, backing_format, path, size;
        bool quiet = false;
    };
    auto args = std::make_shared<Args>();
    command->add_option("-f", args->format, "Image format: qcow2 (the only one written)");
    command->add_option("-o", args->options,
                        "qemu-img's -o options: compat, cluster_size, extended_l2, "
                        "compression_type, refcount_bits, lazy_refcounts, data_file, "
                        "data_file_raw, backing_file, backing_fmt, preallocation=off");
    command->add_option("-b", args->backing,
                        "Backing file, stored as given (relative to IMAGE's directory)");
    command->add_option("-F", args->backing_format, "Backing file format: qcow2 or raw")
        ->check(one_of({"qcow2", "raw"}));
    command->add_flag("-q", args->quiet, "Quiet: no output (there is none; as qemu-img)");
    command->add_option("IMAGE", args->path, "The qcow2 image to create")->required();
    command->add_option("SIZE", args->size,
                        "Virtual size (qemu's syntax: 10G, 512M, 1.5T); default: the backing "
                        "file's");
    return {command, [args] {
                require_qcow2(args->format);
                CreateOptions options;
                if (auto ok = parse_create_options(args->options, options); !ok)
                    throw UsageError(ok.error().message);
                if (!args->backing.empty())
                    options.backing_file = args->backing;
                if (!args->backing_format.empty())
                    options.backing_format = args->backing_format;
                if (options.backing_format && !options.backing_file)
                    throw UsageError("-F needs a backing file (-b)");
                std::uint64_t size = 0;
                if (!args->size.empty())
                    size = size_option("SIZE", args->size);
                else if (!options.backing_file)
                    throw UsageError("SIZE is needed when there is no backing file (-b)");
                if (auto ok = create(std::filesystem::path(args->path), size, options); !ok)
                    return report_error(args->path, ok.error(), kExitImageError,
                                        ImageAccess::write);
                return static_cast<int>(kExitOk);
            }};
}

Command add_resize(CLI::App& app) {
    auto* command = app.add_subcommand(
        "resize", "Change the virtual size of a qcow2 image in place (qemu-img resize); "
                  "shrinking needs --shrink and an unallocated tail");
    struct Args {
        std::string format, path, size;
        bool shrink = false, quiet = false;
    };
    auto args = std::make_shared<Args>();
    command->add_option("-f", args->format, "Image format: qcow2 (the only one written)");
    command->add_flag("--shrink", args->shrink,
                      "Allow a smaller size (refused when data lies past the new end)");
    command->add_flag("-q", args->quiet, "Quiet: no \"Image resized.\"");
    command->add_option("IMAGE", args->path, "The qcow2 image")->required();
    // A negative SIZE ("-1G") is taken as SIZE, not as an option: main() puts "--" before it.
    command->add_option("SIZE", args->size, "New size, or +SIZE / -SIZE relative to the current")
        ->required();
    return {
        command, [args] {
            require_qcow2(args->format);
            const std::string& text = args->size;
            const bool relative = !text.empty() && (text[0] == '+' || text[0] == '-');
            const std::uint64_t amount = size_option("SIZE", relative ? text.substr(1) : text);
            auto image = WritableImage::open(std::filesystem::path(args->path));
            if (!image)
                return report_error(args->path, image.error(), kExitImageError, ImageAccess::write);
            const std::uint64_t current = image->size();
            std::uint64_t wanted = amount;
            if (relative && text[0] == '+') {
                if (amount > UINT64_MAX - current)
                    return report(args->path, "the new size overflows", kExitImageError);
                wanted = current + amount;
            } else if (relative) {
                if (amount > current) {
                    return report(args->path, "Image size cannot be negative", kExitImageError);
                }
                wanted = current - amount;
            }
            if (wanted < current && !args->shrink) {
                // qemu-img resize's own refusal.
                return report(args->path, "Use the --shrink option to perform a shrink operation.",
                              kExitImageError);
            }
            if (auto ok = image->resize(wanted); !ok)
                return report_error(args->path, ok.error(), kExitImageError, ImageAccess::write);
            if (auto ok = image->close(); !ok)
                return report_error(args->path, ok.error(), kExitImageError, ImageAccess::write);
            say(args->quiet, "Image resized.\n");
            return static_cast<int>(kExitOk);
        }};
}

Command add_bitmap(CLI::App& app) {
    auto* command = app.add_subcommand(
        "bitmap", "Add, remove, clear, enable, disable or merge a persistent dirty bitmap "
                  "(qemu-img bitmap); several operations apply in the order given");
    struct Args {
        std::string format, path, name, source_file, source_format;
        std::vector<std::string> merge;
        std::string granularity;
        bool add = false, remove = false, clear = false, enable = false, disable = false;
    };
    auto args = std::make_shared<Args>();
    command->add_flag("--add", args->add, "Create NAME (enabled, empty)");
    command->add_flag("--remove", args->remove, "Delete NAME and free its clusters");
    command->add_flag("--clear", args->clear, "Clear every bit of NAME");
    command->add_flag("--enable", args->enable, "Let writes set bits of NAME");
    command->add_flag("--disable", args->disable, "Stop writes setting bits of NAME");
    command->add_option("--merge", args->merge, "Set in NAME every bit set in bitmap SOURCE")
        ->take_last()
        ->type_name("SOURCE");
    command->add_option("-b", args->source_file,
                        "The image holding --merge's SOURCE (default: IMAGE)");
    command->add_option("-F", args->source_format, "Format of -b's image: qcow2 or raw")
        ->check(one_of({"qcow2", "raw"}));
    command->add_option("-g", args->granularity,
                        "--add: bytes per bit, a power of two from 512 to 2G (default: the "
                        "cluster size within 4K..64K)");
    command->add_option("-f", args->format, "Image format: qcow2 (the only one written)");
    command->add_option("IMAGE", args->path, "The qcow2 image")->required();
    command->add_option("NAME", args->name, "The bitmap")->required();
    return {
        command, [command, args] {
            require_qcow2(args->format);
            std::vector<BitmapEdit> edits;
            std::uint64_t granularity = 0;
            if (!args->granularity.empty())
                granularity = size_option("-g", args->granularity);
            // In the order of the command line, as qemu-img applies them.
            for (const CLI::Option* option : command->parse_order()) {
                BitmapEdit edit;
                const std::string& name = option->get_name();
                if (name == "--add") {
                    edit.kind = BitmapEdit::Kind::add;
                    edit.granularity = granularity;
                } else if (name == "--remove") {
                    edit.kind = BitmapEdit::Kind::remove;
                } else if (name == "--clear") {
                    edit.kind = BitmapEdit::Kind::clear;
                } else if (name == "--enable") {
                    edit.kind = BitmapEdit::Kind::enable;
                } else if (name == "--disable") {
                    edit.kind = BitmapEdit::Kind::disable;
                } else if (name == "--merge") {
                    edit.kind = BitmapEdit::Kind::merge;
                    edit.source = args->merge.empty() ? std::string() : args->merge.back();
                    if (!args->source_file.empty())
                        edit.source_image = args->source_file;
                    if (!args->source_format.empty())
                        edit.source_format = args->source_format;
                } else {
                    continue;
                }
                edits.push_back(std::move(edit));
            }
            if (edits.empty()) {
                throw UsageError("need at least one of --add, --remove, --clear, --enable, "
                                 "--disable, or --merge");
            }
            const bool has_add = std::any_of(edits.begin(), edits.end(), [](const auto& e) {
                return e.kind == BitmapEdit::Kind::add;
            });
            const bool has_merge = std::any_of(edits.begin(), edits.end(), [](const auto& e) {
                return e.kind == BitmapEdit::Kind::merge;
            });
            // qemu-img bitmap's own usage errors.
            if (!args->granularity.empty() && !has_add)
                throw UsageError("granularity only supported with --add");
            if (!args->source_file.empty() && !has_merge)
                throw UsageError("-b only supported with --merge");
            if (!args->source_format.empty() && args->source_file.empty())
                throw UsageError("-F only supported with -b");
            if (auto ok = edit_bitmaps(std::filesystem::path(args->path), args->name, edits); !ok)
                return report_error(args->path, ok.error(), kExitImageError, ImageAccess::write);
            return static_cast<int>(kExitOk);
        }};
}

/// qemu-img's -t CACHE for the image written: "writeback" (the page cache, the default) or
/// "none" (data written past the page cache, O_DIRECT; metadata and flushes as always).
void add_cache_option(CLI::App& command, std::string& cache, const char* written) {
    command
        .add_option("-t", cache,
                    fmt::format("Cache mode of {} written: writeback (the default) or none "
                                "(its data bypasses the page cache, O_DIRECT, as qemu-img -t "
                                "none; faster where the page cache is costly)",
                                written))
        ->check(one_of({"none", "writeback"}))
        ->option_text("CACHE");
}

Command add_commit(CLI::App& app) {
    auto* command = app.add_subcommand(
        "commit", "Write an overlay's data into its backing file (or BASE down the chain), then "
                  "empty the overlay unless -d (qemu-img commit)");
    struct Args {
        std::string format, base, path, cache = "writeback";
        bool keep = false, progress = false, quiet = false;
    };
    auto args = std::make_shared<Args>();
    command->add_option("-f", args->format, "Image format: qcow2 (the only one written)");
    add_cache_option(*command, args->cache, "the base");
    command->add_option("-b", args->base,
                        "The layer of the backing chain to commit into (implies -d)");
    command->add_flag("-d", args->keep, "Keep the overlay's data (do not empty it)");
    command->add_flag("-p,--progress", args->progress, "Show progress on stderr");
    command->add_flag("-q", args->quiet, "Quiet: no \"Image committed.\"");
    command->add_option("OVERLAY", args->path, "The qcow2 image to commit")->required();
    return {command, [args] {
                require_qcow2(args->format);
                CommitOptions options;
                if (!args->base.empty())
                    options.base = args->base;
                options.drop = args->keep;
                options.direct_writes = args->cache == "none";
                Progress progress(args->progress, 1);
                if (args->progress)
                    options.progress = progress.callback();
                auto stats = commit(std::filesystem::path(args->path), options);
                progress.finish();
                if (!stats)
                    return report_error(args->path, stats.error(), kExitImageError,
                                        ImageAccess::write);
                say(args->quiet, "Image committed.\n");
                return static_cast<int>(kExitOk);
            }};
}

Command add_rebase(CLI::App& app) {
    auto* command = app.add_subcommand(
        "rebase", "Change the backing file of a qcow2 image (qemu-img rebase): safe mode copies "
                  "what the old and new backing files differ in; -u only rewrites the name; "
                  "-b \"\" flattens");
    struct Args {
        std::string format, backing, backing_format, path, cache = "writeback";
        bool unsafe = false, progress = false, quiet = false;
    };
    auto args = std::make_shared<Args>();
    command->add_option("-f", args->format, "Image format: qcow2 (the only one written)");
    add_cache_option(*command, args->cache, "the image");
    command
        ->add_option("-b", args->backing,
                     "The new backing file, stored as given (\"\": none, the image is "
                     "flattened)")
        ->required();
    command->add_option("-F", args->backing_format, "Format of the new backing file: qcow2 or raw")
        ->check(one_of({"qcow2", "raw"}));
    command->add_flag("-u", args->unsafe,
                      "Unsafe: only rewrite the reference (the new backing file must read as "
                      "the old one)");
    command->add_flag("-p,--progress", args->progress, "Show progress on stderr");
    command->add_flag("-q", args->quiet, "Quiet (there is no output; as qemu-img)");
    command->add_option("IMAGE", args->path, "The qcow2 image")->required();
    return {command, [args] {
                require_qcow2(args->format);
                RebaseOptions options;
                options.backing_file = args->backing;
                if (!args->backing_format.empty())
                    options.backing_format = args->backing_format;
                if (options.backing_format && args->backing.empty())
                    throw UsageError("-F needs a backing file (-b NAME)");
                options.unsafe = args->unsafe;
                options.direct_writes = args->cache == "none";
                Progress progress(args->progress, 1);
                if (args->progress)
                    options.progress = progress.callback();
                auto stats = rebase(std::filesystem::path(args->path), options);
                progress.finish();
                if (!stats)
                    return report_error(args->path, stats.error(), kExitImageError,
                                        ImageAccess::write);
                return static_cast<int>(kExitOk);
            }};
}

} // namespace qcowmap::cli
