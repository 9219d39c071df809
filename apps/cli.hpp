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
    /// Adds IMAGE and --backing; `contents` adds the options of commands that read the disk
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

/// Adds `--io=auto|read|mmap` to a command that streams disk data: "mmap" consumes data runs
/// from the mapping with no copy, "read" reads them with pread into a cache-sized buffer, and
/// "auto" (the default) takes whichever costs less on this machine, measured once at run time
/// (automatic_data_access). All give the same bytes.
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
