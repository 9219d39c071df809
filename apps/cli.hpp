// Shared pieces of the qcowmap command-line tool: exit codes, the one-line error format,
// opening images, size parsing, JSON strings and progress.
#pragma once

#include <qcowmap/image.hpp>

#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace qcowmap::cli {

/// Exit codes (documented in README.md).
enum ExitCode : int {
    kExitOk = 0,
    kExitImageError = 1,  ///< the image could not be opened, validated or read
    kExitUsage = 2,       ///< bad command line
    kExitOutputError = 3, ///< the output could not be written (or exists without --force)
    kExitDataLost = 4,    ///< --salvage: done, but some ranges could not be read (zeros)
};

/// Prints `qcowmap: FILE: message` on stderr and returns `code`.
int report(std::string_view file, std::string_view message, int code);

/// Flushes stdout; a write error (full disk, closed pipe with SIGPIPE ignored) is reported and
/// gives kExitOutputError.
int finish_stdout();

/// `text` with control characters shown as \xNN, for one-line messages and terminal output of
/// names that come from an image.
std::string printable(std::string_view text);

/// Options shared by commands that open an image.
struct ImageArgs {
    std::string path;
    std::string backing = "follow";
    std::string data_file;
    std::string snapshot;
    bool untrusted = false;
    bool salvage = false;
    /// Adds IMAGE, --backing and --untrusted; `contents` adds the options of commands that read the
    /// disk
    /// (--data-file, --snapshot).
    void add_to(CLI::App& command, bool contents = true);
    OpenOptions open_options() const;
};

/// The message for an image file that shrank while it was being read.
inline constexpr const char* kImageChanged =
    "image changed while being read (the file shrank under its mapping)";

/// Turns a SIGBUS (a mapped file truncated while we read it: the one fault a bounds check
/// cannot prevent) into the one-line error "image changed while being read" and `exit_code`
/// (1 by default; compare uses qemu-img's read-error code 4).
void guard_against_shrinking(std::string_view file, int exit_code = kExitImageError);

/// Opens the image (guarded by guard_against_shrinking) or prints the error line; returns
/// nullopt on failure.
std::optional<Image> open_or_report(const ImageArgs& args);

/// Adds `--untrusted` (confine the references an image names to its directory) to `command`.
void add_untrusted_option(CLI::App& command, bool& untrusted);

/// `message` as the CLI shows it: a refusal made because of --untrusted names the flag.
std::string with_flag_names(std::string message);

/// Adds `--salvage` (read a damaged image, damaged ranges as zeros) to `command`.
void add_salvage_option(CLI::App& command, bool& salvage);

/// Prints what an image opened with --salvage could not read, one line per damaged range
/// (`qcowmap: IMAGE: salvage: 0x10000 (+0x10000) read as zeros: why`).
void report_damage(std::string_view file, const Image& image);

/// `code`, or kExitDataLost when it is kExitOk but `image` (opened with --salvage) lost data.
int salvage_exit(const Image& image, int code);

/// Adds `--io=read|mmap` to a command that streams disk data: "read" (the default) reads data
/// runs with pread into a cache-sized buffer, "mmap" consumes them from the mapping with no
/// copy. Both give the same bytes; which is faster depends on the machine (README).
void add_io_option(CLI::App& command, DataAccess& access);

/// Parses "4096", "64k", "1M", "2G", "1T" (binary units) into bytes.
std::optional<std::uint64_t> parse_size(std::string_view text);

/// A JSON string literal for `text` (quotes included, control characters escaped).
std::string json_string(std::string_view text);

/// "1 MiB" style sizes, as qemu-img prints them (qemu's size_to_str: "%0.3g", 1000 B → KiB).
std::string human_size(std::uint64_t bytes);

/// Progress on stderr ("    (42.00/100%)" redrawn in place), like qemu-img -p.
class Progress {
  public:
    Progress(bool enabled, std::uint64_t total);
    void update(std::uint64_t done);
    void finish();

  private:
    bool enabled_;
    std::uint64_t total_;
    int last_hundredths_ = -1;
};

/// Threads for producing disk contents (decompression runs ahead of the writer): one per core.
unsigned worker_threads();

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

/// One line describing a bitmap (name, granularity, flags, consistency), for `info`.
std::string describe_bitmap(const BitmapEntry& entry);
Command add_hash(CLI::App& app);
Command add_compare(CLI::App& app);
Command add_check(CLI::App& app);

} // namespace qcowmap::cli
