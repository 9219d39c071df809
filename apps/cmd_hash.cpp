// qcowmap hash: digests of the virtual disk, whole (coreutils format) or per block (manifests).
#include "cli.hpp"

#include <qcowmap/hash.hpp>

#include <fmt/format.h>

#include <cstdio>

namespace qcowmap::cli {
namespace {

struct HashArgs {
    std::vector<std::string> images;
    std::string algorithm = "sha256";
    std::string block_size;
    bool json = false;
    unsigned threads = 0;
    DataAccess io = DataAccess::automatic;
    ImageArgs open; // --backing, --data-file, --snapshot (its path is set per image)
};

/// Buffered stdout: manifests of large disks are hundreds of thousands of lines.
class Out {
  public:
    std::string text;
    void flush_if_big() {
        if (text.size() > (1 << 16))
            flush();
    }
    void flush() {
        std::fwrite(text.data(), 1, text.size(), stdout);
        text.clear();
    }
};

int hash_whole(const HashArgs& args, HashAlgorithm algorithm) {
    Out out;
    int status = kExitOk;
    if (args.json)
        out.text += "[";
    bool first = true;
    HashOptions options;
    options.algorithm = algorithm;
    options.threads = args.threads;
    options.data_access = args.io;
    // Several images are hashed at once, one per core, and printed in argument order.
    std::string names;
    for (const std::string& path : args.images)
        names += (names.empty() ? "" : ", ") + path;
    guard_against_shrinking(names);
    auto open = [&](std::size_t i) {
        ImageArgs image_args = args.open;
        image_args.path = args.images[i];
        return Image::open(image_args.path, image_args.open_options());
    };
    (void)hash_images(args.images.size(), open, options,
                      [&](std::size_t i, const Result<ImageDigest>& digest) -> Result<void> {
                          const std::string& path = args.images[i];
                          if (!digest) {
                              // like sha256sum: report, go on with the next file
                              out.flush();
                              std::fflush(stdout);
                              report(path, digest.error().message, kExitImageError);
                              status = kExitImageError;
                              return {};
                          }
                          if (args.json) {
                              out.text += fmt::format(
                                  "{}\n{{\"image\": {}, \"algorithm\": \"{}\", \"size\": {}, "
                                  "\"digest\": \"{}\"}}",
                                  first ? "" : ",", json_string(path), to_string(algorithm),
                                  digest->size, digest->digest.hex());
                          } else {
                              // coreutils' format: digest, two spaces (text mode), name.
                              out.text += fmt::format("{}  {}\n", digest->digest.hex(), path);
                          }
                          first = false;
                          out.flush(); // one line per image as soon as it is known
                          return {};
                      });
    if (args.json)
        out.text += "\n]\n";
    out.flush();
    return status;
}

int hash_manifest(const HashArgs& args, HashAlgorithm algorithm, std::uint64_t block_size) {
    Out out;
    if (args.json)
        out.text += "[";
    bool first_image = true;
    for (const std::string& path : args.images) {
        ImageArgs image_args = args.open;
        image_args.path = path;
        auto image = open_or_report(image_args);
        if (!image) {
            out.flush();
            return kExitImageError; // a manifest cut short must not look complete
        }
        const std::uint64_t size = image->size();
        const std::uint64_t blocks = size / block_size + (size % block_size != 0);
        if (args.json) {
            out.text += fmt::format("{}\n{{\"image\": {}, \"algorithm\": \"{}\", \"size\": {}, "
                                    "\"block-size\": {}, \"blocks\": [",
                                    first_image ? "" : ",", json_string(path), to_string(algorithm),
                                    size, block_size);
        } else {
            out.text +=
                fmt::format("# qcowmap block manifest: algorithm={} block-size={} "
                            "size={} blocks={} image={}\n",
                            to_string(algorithm), block_size, size, blocks, printable(path));
        }
        first_image = false;
        BlockHashOptions options;
        options.algorithm = algorithm;
        options.block_size = block_size;
        options.threads = args.threads;
        options.data_access = args.io;
        auto result = hash_blocks(*image, options, [&](const BlockDigest& b) -> Result<void> {
            if (args.json) {
                out.text += fmt::format("{}\n{{\"index\": {}, \"offset\": {}, \"length\": {}, "
                                        "\"digest\": \"{}\", \"zero\": {}}}",
                                        b.index == 0 ? "" : ",", b.index, b.offset, b.length,
                                        b.digest.hex(), b.zero);
            } else {
                out.text += fmt::format("{} {} {} {}\n", b.index, b.offset, b.digest.hex(),
                                        b.zero ? "zero" : "data");
            }
            out.flush_if_big();
            return {};
        });
        if (!result) {
            out.flush();
            std::fflush(stdout);
            return report(path, result.error().message, kExitImageError);
        }
        if (args.json)
            out.text += "\n]}";
    }
    if (args.json)
        out.text += "\n]\n";
    out.flush();
    return kExitOk;
}

} // namespace

Command add_hash(CLI::App& app) {
    auto* command = app.add_subcommand(
        "hash", "Digest of the whole virtual disk (as sha256sum of qemu-img convert -O raw "
                "output), or one digest per block with --block-size");
    auto args = std::make_shared<HashArgs>();
    command->add_option("IMAGE", args->images, "qcow2 image files")->required();
    command->add_option("--algo", args->algorithm, "sha256 (default), sha512, blake2b512, xxh3-128")
        ->check(CLI::IsMember({"sha256", "sha512", "blake2b512", "xxh3-128"}));
    command->add_option("--block-size", args->block_size,
                        "Print a block manifest: one digest per block of this size (a power of "
                        "two >= 4k; k/M/G suffixes)");
    command->add_flag("--json", args->json, "JSON output");
    add_io_option(*command, args->io);
    command
        ->add_option("--threads", args->threads,
                     "Worker threads (block hashing, decompression); 0 = one per core")
        ->check(CLI::Range(0u, 1024u));
    command
        ->add_option("--backing", args->open.backing,
                     "follow: read through the backing chain (default); none: read only this "
                     "image, unallocated ranges read as zeros")
        ->check(CLI::IsMember({"follow", "none"}));
    command->add_option("--data-file", args->open.data_file,
                        "External data file to use instead of the one the image names");
    command->add_option("--snapshot", args->open.snapshot,
                        "Hash this internal snapshot (ID or name) instead of the active disk");
    return {command, [args] {
                auto algorithm = parse_hash_algorithm(args->algorithm);
                if (!algorithm) {
                    return report("usage", fmt::format("unknown --algo '{}'", args->algorithm),
                                  kExitUsage);
                }
                if (args->block_size.empty())
                    return hash_whole(*args, *algorithm);
                auto size = parse_size(args->block_size);
                if (!size || *size < kMinHashBlockSize || (*size & (*size - 1)) != 0) {
                    return report("usage",
                                  fmt::format("invalid --block-size '{}' (a power of two of at "
                                              "least 4k)",
                                              args->block_size),
                                  kExitUsage);
                }
                return hash_manifest(*args, *algorithm, *size);
            }};
}

} // namespace qcowmap::cli
