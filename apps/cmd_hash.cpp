// qcowmap hash: digests of the virtual disk, whole (coreutils format, checked back with
// --check like sha256sum -c; the blkhash algorithms print what blksum prints) or per block
// (manifests).
#include "cli.hpp"

#include <qcowmap/hash.hpp>
#include <qcowmap/salvage.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>

namespace qcowmap::cli {
namespace {

struct HashArgs {
    std::vector<std::string> files;
    std::string algorithm = "sha256";
    bool algorithm_given = false;
    std::string block_size;
    OutputOption output;
    unsigned threads = 0;
    std::string io = "auto";
    bool progress = false;
    bool check = false;
    bool quiet = false;
    bool status = false;
    bool ignore_missing = false;
    ImageArgs open; // -f, --backing, --data-file, --snapshot (its path is set per image)
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

/// A file name as coreutils prints it in a digest line: a name holding a backslash, a newline
/// or a carriage return has them escaped (\\, \n, \r) and the line starts with a backslash.
struct EscapedName {
    bool escaped = false;
    std::string text;
};

EscapedName escape_name(std::string_view name) {
    EscapedName out;
    out.escaped = name.find_first_of("\\\n\r") != std::string_view::npos;
    for (char c : name) {
        if (out.escaped && c == '\\')
            out.text += "\\\\";
        else if (out.escaped && c == '\n')
            out.text += "\\n";
        else if (out.escaped && c == '\r')
            out.text += "\\r";
        else
            out.text += c;
    }
    return out;
}

/// The reverse of escape_name for the name of an escaped line; nullopt for a bad escape.
std::optional<std::string> unescape_name(std::string_view text) {
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (text[i] != '\\') {
            out += text[i];
            continue;
        }
        if (++i == text.size())
            return std::nullopt;
        switch (text[i]) {
        case '\\':
            out += '\\';
            break;
        case 'n':
            out += '\n';
            break;
        case 'r':
            out += '\r';
            break;
        default:
            return std::nullopt;
        }
    }
    return out;
}

/// The tag of the BSD form (`sha256sum --tag`, `b2sum --tag`, `xxhsum --tag`); a blkhash
/// algorithm's name in upper case.
std::string bsd_tag(HashAlgorithm algorithm) {
    switch (algorithm) {
    case HashAlgorithm::sha256:
        return "SHA256";
    case HashAlgorithm::sha512:
        return "SHA512";
    case HashAlgorithm::blake2b512:
        return "BLAKE2b";
    case HashAlgorithm::xxh3_128:
        return "XXH128";
    default:
        break;
    }
    std::string tag(to_string(algorithm));
    for (char& c : tag)
        c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return tag;
}

} // namespace

CLI::Validator one_of_hash_algorithms() {
    return one_of({"sha256", "sha512", "blake2b512", "xxh3-128", "blkhash-sha256", "blkhash-sha512",
                   "blkhash-blake2b512"});
}

std::string digest_line(const Digest& digest, HashAlgorithm algorithm, std::string_view name,
                        bool tagged) {
    EscapedName escaped = escape_name(name);
    if (tagged) {
        return fmt::format("{}{} ({}) = {}\n", escaped.escaped ? "\\" : "", bsd_tag(algorithm),
                           escaped.text, digest.hex());
    }
    return fmt::format("{}{}  {}\n", escaped.escaped ? "\\" : "", digest.hex(), escaped.text);
}

namespace {

Result<Digest> digest_of(const HashArgs& args, const Image& image, HashAlgorithm algorithm) {
    Progress meter(args.progress, image.size());
    HashOptions options;
    options.algorithm = algorithm;
    options.threads = args.threads;
    options.data_access = data_access(args.io);
    options.progress = meter.callback();
    auto digest = hash_image(image, options);
    if (digest)
        meter.finish();
    return digest;
}

/// --salvage --output=json: the damaged ranges of an image, `[{"offset", "length", "reason"}]`.
std::string json_damage(const Image& image) {
    std::string out = "[";
    for (const DamagedRange& r : salvage_report(image).ranges) {
        out += fmt::format("{}{{\"offset\": {}, \"length\": {}, \"reason\": {}}}",
                           out.size() > 1 ? ", " : "", r.offset, r.length, json_string(r.reason));
    }
    return out + "]";
}

int hash_whole(const HashArgs& args, HashAlgorithm algorithm) {
    Out out;
    int status = kExitOk;
    bool lost = false; // --salvage: some image read damaged ranges as zeros
    const bool json = args.output.json();
    if (json)
        out.text += "[";
    bool first = true;
    // Prints image `i`'s digest (or reports why it has none) as soon as it and those before
    // it are known. `damaged`: with --salvage, the image's damaged ranges as JSON.
    auto print = [&](std::size_t i, const Result<ImageDigest>& digest,
                     const std::string& damaged) -> Result<void> {
        const std::string& path = args.files[i];
        if (!digest) {
            // Like sha256sum: report, go on with the next file, exit 1 at the end.
            out.flush();
            std::fflush(stdout);
            report_error(path, digest.error(), kExitImageError);
            status = kExitImageError;
        }
        if (json) {
            out.text += fmt::format("{}\n{{\"image\": {}, \"algorithm\": \"{}\", ",
                                    first ? "" : ",", json_string(path), to_string(algorithm));
            if (!digest) {
                out.text += fmt::format("\"error\": {}, \"error-code\": \"{}\"}}",
                                        json_string(digest.error().message),
                                        to_string(digest.error().code));
            } else {
                out.text += fmt::format(
                    "\"size\": {}, \"digest\": \"{}\"{}}}", digest->size, digest->digest.hex(),
                    args.open.salvage ? ", \"damaged\": " + damaged : std::string());
            }
            first = false;
        } else if (digest) {
            // coreutils' format (and blksum's): digest, two spaces (text mode), name.
            out.text += digest_line(digest->digest, algorithm, path, false);
        }
        out.flush(); // one line per image as soon as it is known
        return {};
    };
    if (args.progress || args.open.salvage || args.files.size() == 1) {
        // One image at a time, each with every thread (and its own progress meter; --salvage
        // reports each image's damaged ranges before its digest).
        for (std::size_t i = 0; i < args.files.size(); ++i) {
            const std::string& path = args.files[i];
            ImageArgs image_args = args.open;
            image_args.path = path;
            guard_against_shrinking(path);
            auto image = Image::open(path, image_args.open_options());
            if (!image) {
                (void)print(i, std::move(image).error(), {});
                continue;
            }
            std::string damaged = "[]";
            if (args.open.salvage) {
                report_damage(path, *image);
                lost = lost || salvage_report(*image).data_lost();
                damaged = json_damage(*image);
            }
            auto digest = digest_of(args, *image, algorithm);
            (void)print(i,
                        digest ? Result<ImageDigest>(ImageDigest{*digest, image->size()})
                               : Result<ImageDigest>(std::move(digest).error()),
                        damaged);
        }
    } else {
        // Several images are hashed at once, one per core, and printed in argument order.
        std::string names;
        for (const std::string& path : args.files)
            names += (names.empty() ? "" : ", ") + printable(path);
        guard_against_shrinking(names);
        HashOptions options;
        options.algorithm = algorithm;
        options.threads = args.threads;
        options.data_access = data_access(args.io);
        auto open = [&](std::size_t i) {
            ImageArgs image_args = args.open;
            image_args.path = args.files[i];
            return Image::open(image_args.path, image_args.open_options());
        };
        (void)hash_images(
            args.files.size(), open, options,
            [&](std::size_t i, const Result<ImageDigest>& digest) { return print(i, digest, {}); });
    }
    if (json)
        out.text += "\n]\n";
    out.flush();
    return status == kExitOk && lost ? static_cast<int>(kExitDataLost) : status;
}

int hash_manifest(const HashArgs& args, HashAlgorithm algorithm, std::uint64_t block_size) {
    Out out;
    bool lost = false;
    const bool json = args.output.json();
    if (json)
        out.text += "[";
    bool first_image = true;
    for (const std::string& path : args.files) {
        ImageArgs image_args = args.open;
        image_args.path = path;
        auto image = open_or_report(image_args);
        if (!image) {
            out.flush();
            return kExitImageError; // a manifest cut short must not look complete
        }
        lost = lost || salvage_report(*image).data_lost();
        const std::uint64_t size = image->size();
        const std::uint64_t blocks = size / block_size + (size % block_size != 0);
        if (json) {
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
        options.data_access = data_access(args.io);
        Progress meter(args.progress, size);
        auto result = hash_blocks(*image, options, [&](const BlockDigest& b) -> Result<void> {
            if (json) {
                out.text += fmt::format("{}\n{{\"index\": {}, \"offset\": {}, \"length\": {}, "
                                        "\"digest\": \"{}\", \"zero\": {}}}",
                                        b.index == 0 ? "" : ",", b.index, b.offset, b.length,
                                        b.digest.hex(), b.zero);
            } else {
                out.text += fmt::format("{} {} {} {}\n", b.index, b.offset, b.digest.hex(),
                                        b.zero ? "zero" : "data");
            }
            out.flush_if_big();
            meter.update(b.offset + b.length);
            return {};
        });
        if (!result) {
            out.flush();
            std::fflush(stdout);
            return report_error(path, result.error(), kExitImageError);
        }
        meter.finish();
        if (json)
            out.text += "\n]}";
    }
    if (json)
        out.text += "\n]\n";
    out.flush();
    return lost ? static_cast<int>(kExitDataLost) : static_cast<int>(kExitOk);
}

/// One line of a digest list: "HEX  NAME", "HEX *NAME" (binary mode: the same here) or the
/// BSD form "SHA256 (NAME) = HEX"; a leading backslash marks an escaped name.
struct DigestLine {
    std::string hex;
    std::string name;
    std::optional<HashAlgorithm> algorithm; ///< named by a BSD-style line
};

/// The algorithm of a BSD-style tag that names it as --algo does in upper case
/// ("BLKHASH-SHA256", as `convert --digest-file` writes), or nullopt.
std::optional<HashAlgorithm> tag_algorithm(std::string_view tag) {
    std::string lower(tag);
    for (char& c : lower)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    auto algorithm = parse_hash_algorithm(lower);
    if (algorithm && is_blkhash(*algorithm))
        return algorithm;
    return std::nullopt;
}

bool is_hex(std::string_view text) {
    return !text.empty() && text.find_first_not_of("0123456789abcdefABCDEF") == std::string::npos;
}

std::optional<DigestLine> parse_digest_line(std::string_view line) {
    const bool escaped = !line.empty() && line[0] == '\\';
    if (escaped)
        line.remove_prefix(1);
    DigestLine out;
    std::string_view raw_name;
    const std::size_t open = line.find(" (");
    const std::size_t close = line.rfind(") = ");
    if (open != std::string_view::npos && close != std::string_view::npos && open < close &&
        line.substr(0, open).find(' ') == std::string_view::npos) {
        // BSD: "ALGO (NAME) = HEX".
        std::string_view tag = line.substr(0, open);
        raw_name = line.substr(open + 2, close - open - 2);
        out.hex = std::string(line.substr(close + 4));
        if (auto named = tag_algorithm(tag))
            out.algorithm = *named;
        else if (tag == "SHA256")
            out.algorithm = HashAlgorithm::sha256;
        else if (tag == "SHA512")
            out.algorithm = HashAlgorithm::sha512;
        else if (tag == "BLAKE2b")
            out.algorithm = HashAlgorithm::blake2b512;
        else if (tag == "XXH3-128" || tag == "XXH128")
            out.algorithm = HashAlgorithm::xxh3_128;
        else
            return std::nullopt;
    } else {
        const std::size_t space = line.find(' ');
        if (space == std::string_view::npos || space + 2 > line.size() ||
            (line[space + 1] != ' ' && line[space + 1] != '*'))
            return std::nullopt;
        out.hex = std::string(line.substr(0, space));
        raw_name = line.substr(space + 2);
    }
    if (!is_hex(out.hex) || raw_name.empty())
        return std::nullopt;
    for (char& c : out.hex)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (escaped) {
        auto name = unescape_name(raw_name);
        if (!name)
            return std::nullopt;
        out.name = std::move(*name);
    } else {
        out.name = std::string(raw_name);
    }
    return out;
}

/// The algorithm whose digests have `hex_length` digits, when only one has; sha512 for 128
/// (blake2b512 needs --algo, as b2sum needs its own program; so do the blkhash algorithms,
/// whose lines look like those of sha256sum as blksum prints them).
std::optional<HashAlgorithm> algorithm_for_length(std::size_t hex_length) {
    switch (hex_length) {
    case 64:
        return HashAlgorithm::sha256;
    case 128:
        return HashAlgorithm::sha512;
    case 32:
        return HashAlgorithm::xxh3_128;
    default:
        return std::nullopt;
    }
}

std::string plural(std::uint64_t n, const char* one, const char* many) {
    return fmt::format("{} {}", n, n == 1 ? one : many);
}

/// `hash --check LIST...`: like `sha256sum -c`. Each listed image is hashed and reported as
/// "NAME: OK", "NAME: FAILED" or "NAME: FAILED open or read"; warnings count the failures on
/// stderr; exit 1 when anything failed or no line was well formed.
int hash_check(const HashArgs& args) {
    int status = kExitOk;
    for (const std::string& list : args.files) {
        std::ifstream file;
        std::istream* in = &std::cin;
        if (list != "-") {
            file.open(list, std::ios::binary);
            if (!file) {
                report(list, std::strerror(errno ? errno : ENOENT), kExitImageError);
                status = kExitImageError;
                continue;
            }
            in = &file;
        }
        const std::string list_name = list == "-" ? "<stdin>" : list;
        std::uint64_t bad_lines = 0, mismatches = 0, unreadable = 0, checked = 0;
        std::string line;
        while (std::getline(*in, line)) {
            if (!line.empty() && line.back() == '\r')
                line.pop_back();
            if (line.empty() || line[0] == '#')
                continue; // comments (a block manifest's header) and blank lines
            auto entry = parse_digest_line(line);
            std::optional<HashAlgorithm> algorithm;
            if (entry) {
                algorithm = args.algorithm_given ? parse_hash_algorithm(args.algorithm)
                            : entry->algorithm   ? entry->algorithm
                                                 : algorithm_for_length(entry->hex.size());
                if (algorithm && digest_size(*algorithm) * 2 != entry->hex.size())
                    algorithm.reset();
            }
            if (!entry || !algorithm) {
                ++bad_lines;
                continue;
            }
            ++checked;
            ImageArgs image_args = args.open;
            image_args.path = entry->name;
            std::optional<Error> failure;
            std::optional<Digest> digest;
            guard_against_shrinking(entry->name);
            if (auto image = Image::open(entry->name, image_args.open_options()); !image) {
                failure = image.error();
            } else if (auto d = digest_of(args, *image, *algorithm); !d) {
                failure = d.error();
            } else {
                digest = *d;
            }
            if (failure && args.ignore_missing && failure->code == ErrorCode::io_error &&
                failure->system_errno == ENOENT) {
                --checked;
                continue;
            }
            if (failure)
                report_error(entry->name, *failure, kExitImageError);
            const bool ok = digest && digest->hex() == entry->hex;
            if (failure)
                ++unreadable;
            else if (!ok)
                ++mismatches;
            if (!args.status && (!ok || !args.quiet)) {
                // As sha256sum -c prints it: a name with a newline is escaped.
                const bool newline = entry->name.find('\n') != std::string::npos;
                EscapedName name = escape_name(entry->name);
                fmt::print("{}{}: {}\n", newline ? "\\" : "", newline ? name.text : entry->name,
                           failure ? "FAILED open or read"
                           : ok    ? "OK"
                                   : "FAILED");
                std::fflush(stdout);
            }
        }
        if (checked == 0 && unreadable == 0 && !args.ignore_missing) {
            report(list_name, "no properly formatted digest lines found", kExitImageError);
            status = kExitImageError;
            continue;
        }
        if (!args.status) {
            if (bad_lines)
                report(list_name,
                       "WARNING: " + plural(bad_lines, "line is", "lines are") +
                           " improperly formatted",
                       0);
            if (unreadable)
                report(list_name,
                       "WARNING: " + plural(unreadable, "listed file", "listed files") +
                           " could not be read",
                       0);
            if (mismatches)
                report(list_name,
                       "WARNING: " + plural(mismatches, "computed checksum", "computed checksums") +
                           " did NOT match",
                       0);
        }
        if (mismatches || unreadable)
            status = kExitImageError;
    }
    return status;
}

} // namespace

Command add_hash(CLI::App& app) {
    auto* command = app.add_subcommand(
        "hash", "Digest of the whole virtual disk (as sha256sum of qemu-img convert -O raw "
                "output), or one digest per block with --block-size; --check verifies a list");
    auto args = std::make_shared<HashArgs>();
    command
        ->add_option("FILE", args->files,
                     "Images to hash (several at once, one per core, printed in argument "
                     "order; with --check: digest lists as hash prints them, - for standard "
                     "input)")
        ->required();
    auto* algo =
        command
            ->add_option("--algo", args->algorithm,
                         "sha256 (default), sha512, blake2b512, xxh3-128: of the raw disk as "
                         "sha256sum & co. give it; blkhash-sha256, blkhash-sha512, "
                         "blkhash-blake2b512: as blksum gives it, at the cost of the allocated "
                         "data on every core (--check needs --algo for these)")
            ->check(one_of_hash_algorithms())
            ->option_text("ALGO");
    command
        ->add_option("--block-size", args->block_size,
                     "Print a block manifest: one digest per block of this size (a power of "
                     "two >= 4k; k/M/G suffixes)")
        ->option_text("SIZE");
    args->output.add_to(*command, "an array of {image, algorithm, size, digest} (or error)");
    command->add_flag("-c,--check", args->check,
                      "Read digests from the FILEs and check them, like sha256sum -c");
    command->add_flag("--quiet", args->quiet, "With --check: do not print OK for each image");
    command->add_flag("--status", args->status, "With --check: print nothing; the exit code tells");
    command->add_flag("--ignore-missing", args->ignore_missing,
                      "With --check: skip listed images that do not exist");
    command->add_flag("-p,--progress", args->progress, "Show progress on stderr");
    add_io_option(*command, args->io);
    command
        ->add_option("--threads", args->threads,
                     "Worker threads (block hashing, decompression); 0 = one per core")
        ->check(CLI::Range(0u, 1024u))
        ->option_text("N");
    args->open.add_options(*command);
    add_salvage_option(*command, args->open.salvage);
    auto stream = std::make_shared<StreamArgs>();
    stream->add_to(*command);
    return {command, [args, algo, stream] {
                args->algorithm_given = algo->count() > 0;
                auto algorithm = parse_hash_algorithm(args->algorithm);
                if (!algorithm) {
                    throw UsageError(fmt::format("unknown --algo '{}'", args->algorithm));
                }
                if (args->check) {
                    if (args->output.json() || !args->block_size.empty())
                        throw UsageError("--check reads digest lines: it takes neither "
                                         "--output=json nor --block-size");
                    return hash_check(*args);
                }
                if (args->quiet || args->status || args->ignore_missing)
                    throw UsageError("--quiet, --status and --ignore-missing go with --check");
                const bool from_stream =
                    std::find(args->files.begin(), args->files.end(), "-") != args->files.end();
                if (from_stream && args->files.size() > 1)
                    throw UsageError("- (an image on standard input) must be the only FILE");
                if (!from_stream && stream->given())
                    throw UsageError("--max-spool, --expect-checksum and --stream-stats need - "
                                     "(standard input) as the image");
                std::uint64_t block_size = 0;
                if (args->block_size.empty()) {
                    if (from_stream) // apps/stream_input.cpp
                        return hash_from_stream(args->open, *stream, *algorithm, 0,
                                                args->output.json(), args->progress, args->threads);
                    return hash_whole(*args, *algorithm);
                }
                if (is_blkhash(*algorithm)) {
                    throw UsageError(fmt::format(
                        "--algo={} digests the whole disk: a --block-size manifest takes {}",
                        to_string(*algorithm), to_string(block_digest_algorithm(*algorithm))));
                }
                std::string why;
                auto size = parse_size(args->block_size, &why);
                if (!size || *size < kMinHashBlockSize || (*size & (*size - 1)) != 0) {
                    throw UsageError(fmt::format("invalid --block-size '{}': not a power of two "
                                                 "of at least 4k",
                                                 printable(args->block_size)));
                }
                block_size = *size;
                if (from_stream)
                    return hash_from_stream(args->open, *stream, *algorithm, block_size,
                                            args->output.json(), args->progress, args->threads);
                return hash_manifest(*args, *algorithm, block_size);
            }};
}

} // namespace qcowmap::cli
