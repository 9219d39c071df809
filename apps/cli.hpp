// Shared pieces of the qcowmap command-line tool: exit codes, the one-line error format,
// opening images, size parsing, JSON strings and progress.
#pragma once

#include <qcowmap/describe.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace qcowmap {
enum class HashAlgorithm : std::uint8_t;
struct StreamOptions;
} // namespace qcowmap

namespace qcowmap::cli {

/// Exit codes (documented in README.md and qcowmap(1)).
enum ExitCode : int {
    kExitOk = 0,
    kExitImageError = 1, ///< the image could not be opened, validated or read
    /// A bad command line: 1 on every command, as qemu-img exits (so that it never collides
    /// with check's 2 "corruptions found" or compare's 2 "could not open").
    kExitUsage = 1,
    kExitOutputError = 3, ///< the output could not be written (or exists without --force)
    kExitDataLost = 4,    ///< --salvage: done, but some ranges could not be read (zeros)
};

/// Prints `qcowmap: FILE: message` on stderr and returns `code`.
int report(std::string_view file, std::string_view message, int code);

/// What a command does with the image it reports about: the -U hint for an image in use is
/// only for commands that read (a writer cannot share).
enum class ImageAccess { read, write };

/// Reports a library error about `file`: `qcowmap: FILE: message`, or `qcowmap: message` when
/// the library already named the file at the start of its message. Adds the command-line hint
/// for errors the library words in its own terms (a data file to give with --data-file, -U for
/// an image in use when `access` is read).
int report_error(std::string_view file, const Error& error, int code,
                 ImageAccess access = ImageAccess::read);

/// A bad command line, found after parsing (a size that does not parse, options that do not
/// go together). Thrown from a command's run function; main prints
/// `qcowmap: usage: MESSAGE (see qcowmap COMMAND --help)` and exits 1 (kExitUsage).
class UsageError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

/// Flushes stdout; a write error (full disk, closed pipe with SIGPIPE ignored) is reported and
/// gives kExitOutputError.
int finish_stdout();

/// `text` with control characters shown as \xNN, for one-line messages and terminal output of
/// names that come from an image.
std::string printable(std::string_view text);

/// A CLI11 check that the value is one of `choices`: "--io: 'foo' is not one of read, mmap".
CLI::Validator one_of(std::initializer_list<const char*> choices);

/// Options shared by commands that open an image.
struct ImageArgs {
    std::string path;
    std::string backing = "follow";
    std::string data_file;
    std::string snapshot;
    std::string format; ///< -f: "qcow2", "qcow" (read as qcow2) or "raw"; empty: probed
    /// False for `info`: a missing external data file is reported, not fatal.
    bool require_data_file = true;
    bool untrusted = false;
    bool salvage = false;
    bool force_share = false; ///< -U, --force-share: no image locks (qemu-img -U)
    /// Print qemu's warning when probing finds raw (compare, like qemu-img compare, does not).
    bool warn_raw_probe = true;
    /// Adds IMAGE, -f, -U, --backing and --untrusted; `data_file` adds --data-file,
    /// `snapshot` --snapshot.
    void add_to(CLI::App& command, bool data_file = true, bool snapshot = true);
    /// The options without IMAGE (for commands that take several images).
    void add_options(CLI::App& command, bool data_file = true, bool snapshot = true);
    /// The library's options for `path`. Without -f the format of `path` is probed as
    /// qemu-img probes it (probe_image_format), which prints qemu's warning for raw.
    OpenOptions open_options() const;
};

/// Adds `-U, --force-share` (read an image a writer holds: no QEMU image locks) to `command`.
void add_force_share_option(CLI::App& command, bool& force_share);

/// The format of `path` when none was given, as qemu-img probes it (qemu's block.c
/// find_image_format): "qcow2" for the qcow magic (qcow2 and qcow version 1), else "raw",
/// with qemu's warning on stderr unless `warn` is false (one line: reading is fine, but -f raw
/// says so). An image
/// about to be written in place must not be probed raw (qemu restricts writes to block 0
/// then): `for_writing` refuses it with a UsageError asking for -f raw. A file that cannot
/// be read probes as "qcow2" (opening it then says why).
std::string probe_image_format(const std::string& path, bool for_writing = false, bool warn = true);

/// Adds `--output=human|json` and its alias `--json` to `command`; `json()` tells which.
class OutputOption {
  public:
    void add_to(CLI::App& command, const std::string& json_help);
    /// True for --json or --output=json; a UsageError for --json with --output=human.
    bool json() const;

  private:
    std::string output_ = "human";
    bool json_flag_ = false;
    CLI::Option* output_option_ = nullptr;
};

/// The message for an image file that shrank while it was being read.
inline constexpr const char* kImageChanged =
    "image changed while being read (the file shrank under its mapping)";

/// Turns a SIGBUS the library does not contain itself (a mapped file truncated while the CLI's
/// own code reads it: the one fault a bounds check cannot prevent) into the one-line error
/// "image changed while being read" and `exit_code` (1 by default; compare uses qemu-img's
/// read-error code 4). Faults of the library's reads come back as errors of the call.
void guard_against_shrinking(std::string_view file, int exit_code = kExitImageError);

/// Opens the image (guarded by guard_against_shrinking) or prints the error line; returns
/// nullopt on failure.
std::optional<Image> open_or_report(const ImageArgs& args);

/// Adds `--untrusted` (confine the references an image names to its directory) to `command`.
void add_untrusted_option(CLI::App& command, bool& untrusted);

/// The message of `error` as the CLI shows it: a refusal made because of --untrusted names the
/// flag.
std::string with_flag_names(const Error& error);

/// Adds `--salvage` (read a damaged image, damaged ranges as zeros) to `command`.
void add_salvage_option(CLI::App& command, bool& salvage);

/// Prints what an image opened with --salvage could not read, one line per damaged range
/// (`qcowmap: IMAGE: salvage: 0x10000 (+0x10000) read as zeros: why`).
void report_damage(std::string_view file, const Image& image);

/// `code`, or kExitDataLost when it is kExitOk but `image` (opened with --salvage) lost data.
int salvage_exit(const Image& image, int code);

/// Adds `--io=auto|read|mmap` to a command that streams disk data: "mmap" consumes data runs
/// from the mapping with no copy, "read" reads them with pread into a cache-sized buffer, and
/// "auto" (the default) takes whichever costs less on this machine, measured once at run time
/// (automatic_data_access). All give the same bytes.
void add_io_option(CLI::App& command, std::string& access);
/// The DataAccess an `--io` value names.
DataAccess data_access(const std::string& io);

/// Parses a size as qemu-img does (qemu_strtosz, then cvtnum's range): decimal digits, an
/// optional fraction when a suffix follows ("1.5M"), hexadecimal with 0x ("0x100000"), and one
/// optional suffix b/B, k/K, m/M, g/G, t/T, p/P, e/E (binary units); qcowmap also takes KiB,
/// MiB... Values above 2^63 - 1 are refused as qemu-img refuses them. The error says why.
std::optional<std::uint64_t> parse_size(std::string_view text, std::string* why = nullptr);

/// parse_size for the value of `option`, throwing UsageError ("invalid --max-length '-1':
/// sizes cannot be negative") when it does not parse.
std::uint64_t size_option(std::string_view option, const std::string& text);

using qcowmap::json_string; // <qcowmap/describe.hpp>

/// "1 MiB" style sizes, as qemu-img prints them (qemu's size_to_str: "%0.3g", 1000 B → KiB).
std::string human_size(std::uint64_t bytes);

/// Progress on stderr ("    (42.00/100%)" redrawn in place), like qemu-img -p.
class Progress {
  public:
    Progress(bool enabled, std::uint64_t total);
    void update(std::uint64_t done);
    void finish();
    /// A callback for the library's `progress` options, updating this meter.
    std::function<void(std::uint64_t, std::uint64_t)> callback();

  private:
    bool enabled_;
    std::uint64_t total_;
    int last_hundredths_ = -1;
};

/// Writes all of `data` to `fd` (retrying short writes); false with errno set on failure.
bool write_all(int fd, const void* data, std::size_t length);

/// A subcommand and the function that runs it once the command line is parsed.
struct Command {
    CLI::App* parser;
    std::function<int()> run;
};
Command add_info(CLI::App& app);
Command add_map(CLI::App& app);
Command add_cat(CLI::App& app);
Command add_convert(CLI::App& app);
Command add_bitmaps(CLI::App& app);
Command add_hash(CLI::App& app);
Command add_compare(CLI::App& app);
Command add_check(CLI::App& app);
Command add_mount(CLI::App& app);
// cmd_lifecycle.cpp: the commands that change images.
Command add_create(CLI::App& app);
Command add_resize(CLI::App& app);
Command add_bitmap(CLI::App& app);
Command add_commit(CLI::App& app);
Command add_rebase(CLI::App& app);

/// One line describing a bitmap (name, granularity, flags, consistency), for `info`.
std::string describe_bitmap(const BitmapEntry& entry);

/// What `convert` hands the writer of an output format (-O).
struct ConvertJob {
    const Image& image;
    const ImageArgs& source;          ///< the source as given (path, format, backing, ...)
    std::string target;               ///< TARGET as given; "-" is standard output
    bool force = false;               ///< --force: an existing TARGET may be replaced
    bool progress = false;            ///< -p
    std::uint64_t sparse_size = 4096; ///< -S
    DataAccess io = DataAccess::read; ///< --io
    std::string bitmap;               ///< --bitmap: only this bitmap's dirty ranges (may be empty)
    std::optional<HashAlgorithm> digest; ///< --digest: also digest the disk written
    std::string digest_file;             ///< --digest-file: where to write it (else stderr)
};

/// Reports the digest `convert --digest` took of the disk it wrote to `job.target`: one line
/// `HEX  TARGET` on stderr, or with --digest-file the line `ALGO (TARGET) = HEX` (the tagged
/// form `hash --check` reads without --algo) written to that file under a temporary name and
/// renamed. Returns kExitOk, or kExitOutputError after reporting why the file failed.
int deliver_digest(const ConvertJob& job, const Digest& digest);

/// The check of an --algo or --digest value: every name of HashAlgorithm (hash.hpp).
CLI::Validator one_of_hash_algorithms();

/// One digest line as `hash` prints it: `HEX  NAME` (coreutils' format), or with `tagged`
/// `TAG (NAME) = HEX` (the BSD form of `sha256sum --tag`; the tag of a blkhash algorithm is
/// its name in upper case). A name holding a backslash, newline or carriage return is
/// escaped and the line starts with a backslash, as coreutils does. Ends in a newline.
std::string digest_line(const Digest& digest, HashAlgorithm algorithm, std::string_view name,
                        bool tagged);

/// An output format of `convert -O NAME`. Formats register themselves from a static
/// initialiser in their own file (apps/convert_*.cpp): raw is built in.
struct OutputFormat {
    std::string name;
    /// Adds options only this format takes to the convert command (may be empty).
    std::function<void(CLI::App& convert)> add_options;
    /// Writes the job's image in this format; returns the exit code (after reporting errors).
    std::function<int(const ConvertJob& job)> run;
    /// The options of this format the command line gave ("-c, -B"), so that another -O
    /// refuses them; empty when none (may be unset).
    std::function<std::string()> given_options;
};

/// Registers `format` for `convert -O`; false when its name is taken already.
bool register_output_format(OutputFormat format);

// ---------------------------------------------------------------------------------------------
// `-` as the image: read from standard input, once (apps/stream_input.cpp).

/// Options of the commands that take `-` as their image.
struct StreamArgs {
    std::string max_spool;       ///< --max-spool
    std::string expect_checksum; ///< --expect-checksum
    bool stats = false;          ///< --stream-stats
    void add_to(CLI::App& command);
    /// True when any of these options was given (they need `-` as the image).
    bool given() const;
    /// The decoder's options from these and the image's (-f, --backing, --data-file...);
    /// throws UsageError for what a stream cannot do (--snapshot, --salvage...).
    StreamOptions options(const ImageArgs& image, unsigned threads = 0) const;
};

/// What `convert - TARGET` does.
struct StreamConvert {
    std::string target; ///< "-": standard output
    bool force = false;
    bool progress = false;
    std::uint64_t sparse_size = 4096;
    /// For -O formats other than raw: writes the disk (a temporary raw copy of it).
    std::function<int(const Image& image)> write_other;
};
int convert_from_stream(const ImageArgs& source, const StreamArgs& stream,
                        const StreamConvert& job);
/// `hash -`: the whole disk's digest (block_size 0) or a block manifest.
int hash_from_stream(const ImageArgs& source, const StreamArgs& stream, HashAlgorithm algorithm,
                     std::uint64_t block_size, bool json, bool progress, unsigned threads);
/// `info -` and `check -` (`check`): the header and what one pass over the tables finds.
int describe_stream(const ImageArgs& source, const StreamArgs& stream, bool json, bool check);

} // namespace qcowmap::cli
