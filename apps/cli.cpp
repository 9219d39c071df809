#include "cli.hpp"

#include <qcowmap/format.hpp>
#include <qcowmap/references.hpp>
#include <qcowmap/salvage.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sys/stat.h>
#include <unistd.h>

namespace qcowmap::cli {

std::string printable(std::string_view text) {
    std::string out;
    for (char c : text) {
        auto u = static_cast<unsigned char>(c);
        if (u < 0x20 || u == 0x7f) {
            out += fmt::format("\\x{:02x}", u);
        } else {
            out += c;
        }
    }
    return out;
}

int report(std::string_view file, std::string_view message, int code) {
    // Straight to the descriptor: stdio (and fmt's exceptions) must not decide whether an error
    // is shown, even when stderr is closed.
    std::string line = fmt::format("qcowmap: {}: {}\n", printable(file), message);
    ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
    (void)ignored;
    return code;
}

int report_error(std::string_view file, const Error& error, int code, ImageAccess access) {
    std::string message = with_flag_names(error);
    if (error.refusal == Refusal::no_data_file_name) {
        message += " (give one with --data-file)";
    }
    if (error.code == ErrorCode::image_in_use && access == ImageAccess::read) {
        // qemu-img's hint is "Is another process using the image [FILE]?"; ours adds -U.
        message += " (-U reads it anyway, at the risk of a half-written state)";
    }
    if (error.message_names_path && error.path == file) {
        // The library named the file already: "qcowmap: x.qcow2: No such file or directory".
        std::string line = "qcowmap: " + printable(message) + "\n";
        ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
        (void)ignored;
        return code;
    }
    return report(file, message, code);
}

CLI::Validator one_of(std::initializer_list<const char*> choices) {
    std::vector<std::string> list(choices.begin(), choices.end());
    std::string joined;
    for (const std::string& c : list)
        joined += (joined.empty() ? "" : "|") + c;
    return CLI::Validator(
        [list](std::string& value) -> std::string {
            if (std::find(list.begin(), list.end(), value) != list.end())
                return {};
            std::string names;
            for (const std::string& c : list)
                names += (names.empty() ? "" : ", ") + c;
            return fmt::format("'{}' is not one of {}", printable(value), names);
        },
        joined, "one of");
}

int finish_stdout() {
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
        return report("<stdout>", std::strerror(errno ? errno : EIO), kExitOutputError);
    }
    return kExitOk;
}

void ImageArgs::add_to(CLI::App& command, bool with_data_file, bool with_snapshot) {
    command.add_option("IMAGE", path, "The image file (or block device)")->required();
    add_options(command, with_data_file, with_snapshot);
}

void add_force_share_option(CLI::App& command, bool& force_share) {
    command.add_flag("-U,--force-share", force_share,
                     "Read the image even when a writer (a running VM, qemu-io) holds it: take "
                     "no QEMU image locks, as qemu-img -U. A change while reading is reported");
}

std::string probe_image_format(const std::string& path, bool for_writing, bool warn) {
    // Only files and block devices are probed; a directory, a FIFO or a missing file is left
    // for opening to describe (one line).
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)))
        return "qcow2";
    auto probed = probe_format(path);
    if (!probed)
        return "qcow2"; // opening the file says what is wrong with it
    if (*probed == "raw" && !warn && !for_writing)
        return *probed;
    if (*probed == "raw") {
        if (for_writing) {
            throw UsageError(fmt::format("{}: image format was not specified and probing "
                                         "guessed raw: refusing to write to it (give -f raw)",
                                         printable(path)));
        }
        // qemu's words (block.c bdrv_open_inherit), on one line.
        report(path,
               "WARNING: Image format was not specified and probing guessed raw (specify "
               "-f raw to read it as raw without this warning)",
               0);
    }
    return *probed;
}

void ImageArgs::add_options(CLI::App& command, bool with_data_file, bool with_snapshot) {
    command
        .add_option("-f,--format", format,
                    "Format of the image: qcow2 (qcow version 1 too) or raw; default: probed as "
                    "qemu-img does (the qcow magic, else raw with a warning)")
        ->check(one_of({"qcow2", "qcow", "raw"}))
        ->option_text("FMT");
    add_force_share_option(command, force_share);
    command
        .add_option("--backing", backing,
                    "follow: read through the backing chain (default); none: read only this "
                    "image, unallocated ranges read as zeros")
        ->check(one_of({"follow", "none"}))
        ->option_text("follow|none");
    add_untrusted_option(command, untrusted);
    if (with_data_file) {
        command
            .add_option("--data-file", data_file,
                        "External data file to use instead of the one the image names")
            ->option_text("PATH");
    }
    if (with_snapshot) {
        command
            .add_option("--snapshot", snapshot,
                        "Read this internal snapshot (ID or name) instead of the active disk")
            ->option_text("ID_OR_NAME");
    }
}

OpenOptions ImageArgs::open_options() const {
    OpenOptions options;
    options.backing = backing == "none" ? BackingMode::none : BackingMode::follow;
    if (!data_file.empty())
        options.data_file = data_file;
    if (!snapshot.empty())
        options.snapshot = snapshot;
    if (format == "raw")
        options.format = "raw";
    else if (!format.empty())
        options.format = "qcow2"; // qcow version 1 reads as qcow2 does
    else if (!path.empty())
        options.format = probe_image_format(path, false, warn_raw_probe);
    options.force_share = force_share;
    options.require_data_file = require_data_file;
    options.untrusted = untrusted;
    options.salvage = salvage;
    return options;
}

void OutputOption::add_to(CLI::App& command, const std::string& json_help) {
    output_option_ =
        command.add_option("--output", output_, "human (the default) or json: " + json_help)
            ->check(one_of({"human", "json"}))
            ->option_text("human|json");
    command.add_flag("--json", json_flag_, "Same as --output=json");
}

bool OutputOption::json() const {
    if (json_flag_ && output_option_ && output_option_->count() > 0 && output_ == "human")
        throw UsageError("--json and --output=human contradict each other");
    return json_flag_ || output_ == "json";
}

void add_salvage_option(CLI::App& command, bool& salvage) {
    command.add_flag("--salvage", salvage,
                     "Read a damaged image: ranges whose tables or clusters cannot be read read "
                     "as zeros (as qemu-img reads a truncated file), each reported on stderr; "
                     "exit status 4 says data was lost");
}

void report_damage(std::string_view file, const Image& image) {
    const SalvageReport& damage = salvage_report(image);
    for (const DamagedRange& r : damage.ranges) {
        report(file,
               fmt::format("salvage: {:#x} (+{:#x}) {}: {}", r.offset, r.length,
                           r.falls_through ? "read from the backing file" : "read as zeros",
                           r.reason),
               0);
    }
    if (damage.ranges_not_listed) {
        report(file,
               fmt::format("salvage: {} more damaged ranges not listed ({:#x} damaged bytes in "
                           "all)",
                           damage.ranges_not_listed, damage.damaged_bytes),
               0);
    }
}

int salvage_exit(const Image& image, int code) {
    return code == kExitOk && salvage_report(image).data_lost() ? kExitDataLost : code;
}

void add_untrusted_option(CLI::App& command, bool& untrusted) {
    command.add_flag("--untrusted", untrusted,
                     "The image comes from outside: follow a backing or data file name it holds "
                     "only when it is relative, stays inside the image's directory and names a "
                     "regular file");
}

std::string with_flag_names(const Error& error) {
    std::string message = error.message;
    // An untrusted refusal's message ends in kUntrustedRefusalMark: name the flag instead.
    if (error.refusal == Refusal::untrusted && message.ends_with(kUntrustedRefusalMark)) {
        message.resize(message.size() - kUntrustedRefusalMark.size());
        message += " (--untrusted)";
    }
    return message;
}

void add_io_option(CLI::App& command, std::string& access) {
    command
        .add_option("--io", access,
                    "How data is taken from the file: mmap (straight from the mapping, no "
                    "copy), read (pread into a small buffer) or auto (the default: whichever "
                    "costs less on this machine, measured at start). convert -S 0 copies "
                    "inside the kernel either way")
        ->check(one_of({"auto", "read", "mmap"}))
        ->option_text("auto|read|mmap");
}

DataAccess data_access(const std::string& io) {
    return io == "mmap"   ? DataAccess::mapping
           : io == "read" ? DataAccess::read
                          : DataAccess::automatic;
}

namespace {

// The line printed when a mapped file shrinks under us and a read faults (SIGBUS). Prepared
// before any mapping is touched, because a signal handler may only call write and _exit.
char g_sigbus_line[4096];
std::size_t g_sigbus_length = 0;
int g_sigbus_exit_code = kExitImageError;

std::atomic_flag g_sigbus_reported = ATOMIC_FLAG_INIT;

extern "C" void on_sigbus(int) {
    // Several threads may fault at once (decompression workers): one reports, the others wait
    // for its _exit.
    if (g_sigbus_reported.test_and_set()) {
        for (;;)
            ::pause();
    }
    ssize_t ignored = ::write(STDERR_FILENO, g_sigbus_line, g_sigbus_length);
    (void)ignored;
    ::_exit(g_sigbus_exit_code);
}

} // namespace

void guard_against_shrinking(std::string_view file, int exit_code) {
    g_sigbus_exit_code = exit_code;
    std::string line = fmt::format("qcowmap: {}: {}\n", file, kImageChanged);
    g_sigbus_length = std::min(line.size(), sizeof g_sigbus_line);
    std::memcpy(g_sigbus_line, line.data(), g_sigbus_length);
    // Once, below the library's own handler, which contains the faults of its reads (they
    // come back as errors) and hands it every other one (README, "Errors and exit codes").
    static const bool installed = [] {
        struct sigaction action {};
        action.sa_handler = on_sigbus;
        sigemptyset(&action.sa_mask);
        ::sigaction(SIGBUS, &action, nullptr);
        install_fault_handler();
        return true;
    }();
    (void)installed;
}

std::optional<Image> open_or_report(const ImageArgs& args) {
    guard_against_shrinking(args.path);
    auto image = Image::open(args.path, args.open_options());
    if (!image) {
        Error error = std::move(image).error();
        if (error.code == ErrorCode::not_qcow2 && !args.format.empty() && args.format != "raw")
            error.message += " (use -f raw for a raw image)";
        report_error(args.path, error, kExitImageError);
        return std::nullopt;
    }
    if (args.salvage) {
        report_damage(args.path, *image);
    }
    return std::move(*image);
}

namespace {

/// qemu's suffix_mul: the multiplier of a unit letter (binary units), or 0.
std::uint64_t suffix_multiplier(char c) {
    switch (c) {
    case 'b':
    case 'B':
        return 1;
    case 'k':
    case 'K':
        return std::uint64_t{1} << 10;
    case 'm':
    case 'M':
        return std::uint64_t{1} << 20;
    case 'g':
    case 'G':
        return std::uint64_t{1} << 30;
    case 't':
    case 'T':
        return std::uint64_t{1} << 40;
    case 'p':
    case 'P':
        return std::uint64_t{1} << 50;
    case 'e':
    case 'E':
        return std::uint64_t{1} << 60;
    default:
        return 0;
    }
}

std::optional<std::uint64_t> size_error(std::string* why, const char* text) {
    if (why)
        *why = text;
    return std::nullopt;
}

} // namespace

// qemu 7.2's do_strtosz (util/cutils.c): the integral part in decimal (or hexadecimal after
// "0x"), a fraction only before a unit, the product computed exactly in 64.64 fixed point and
// rounded half up; qemu-img's cvtnum then refuses anything above INT64_MAX.
std::optional<std::uint64_t> parse_size(std::string_view text, std::string* why) {
    const std::string s(text); // strtoull/strtod need a terminated string
    const char* begin = s.c_str();
    if (s.empty() || s.find('\0') != std::string::npos)
        return size_error(why, "not a size");
    char* end = nullptr;
    errno = 0;
    std::uint64_t value = std::strtoull(begin, &end, 10);
    if (end == begin)
        return size_error(why, "not a size");
    if (std::find(begin, static_cast<const char*>(end), '-') != end)
        return size_error(why, "sizes cannot be negative");
    if (errno == ERANGE)
        return size_error(why, "too large (at most 9223372036854775807)");
    std::uint64_t fraction = 0; // 0.64 fixed point
    if (value == 0 && (*end == 'x' || *end == 'X')) {
        errno = 0;
        value = std::strtoull(begin, &end, 16);
        if (errno == ERANGE)
            return size_error(why, "too large (at most 9223372036854775807)");
        if (*end == '.')
            return size_error(why, "a hexadecimal size cannot have a fraction");
    } else if (*end == '.') {
        const char* dot = end;
        errno = 0;
        double f = std::strtod(dot, &end);
        if (end == dot || errno != 0) {
            end = const_cast<char*>(dot) + 1; // "1.k": a dot without digits
        } else if (std::find_if(dot, static_cast<const char*>(end),
                                [](char c) { return c == 'e' || c == 'E'; }) != end) {
            return size_error(why, "not a size");
        } else {
            fraction = f >= 1.0 ? UINT64_MAX : static_cast<std::uint64_t>(std::ldexp(f, 64));
        }
    }
    std::uint64_t multiplier = suffix_multiplier(*end);
    if (multiplier != 0) {
        ++end;
        // qcowmap also takes "KiB", "Ki" and "KB" for k.
        std::string_view rest(end);
        if (multiplier > 1 && (rest == "iB" || rest == "i" || rest == "B"))
            end += rest.size();
    } else {
        multiplier = 1;
    }
    if (*end != '\0')
        return size_error(why, "not a size");
    if (multiplier == 1) {
        if (fraction != 0)
            return size_error(why, "a fraction needs a unit (1.5M, 0.5k)");
    } else {
        __extension__ typedef unsigned __int128 u128; // exact 64 x 64 bit products
        u128 whole = u128{value} * multiplier;
        const u128 part = u128{fraction} * multiplier; // 64.64 fixed point
        whole += part >> 64;
        whole += (part >> 63) & 1; // round half up
        if (whole > UINT64_MAX)
            return size_error(why, "too large (at most 9223372036854775807)");
        value = static_cast<std::uint64_t>(whole);
    }
    if (value > static_cast<std::uint64_t>(INT64_MAX))
        return size_error(why, "too large (at most 9223372036854775807)");
    return value;
}

std::uint64_t size_option(std::string_view option, const std::string& text) {
    std::string why;
    auto value = parse_size(text, &why);
    if (!value)
        throw UsageError(fmt::format("invalid {} '{}': {}", option, printable(text), why));
    return *value;
}

std::string human_size(std::uint64_t bytes) {
    static constexpr const char* prefixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
    int exponent = 0;
    std::frexp(static_cast<double>(bytes) / (1000.0 / 1024.0), &exponent);
    int unit = std::clamp((exponent - 1) / 10, 0, 6);
    double value =
        static_cast<double>(bytes) / static_cast<double>(std::uint64_t{1} << (unit * 10));
    return fmt::format("{} {}B", fmt::format("{:.3g}", value), prefixes[unit]);
}

Progress::Progress(bool enabled, std::uint64_t total) : enabled_(enabled), total_(total) {
    update(0);
}

void Progress::update(std::uint64_t done) {
    if (!enabled_) {
        return;
    }
    int hundredths =
        total_ == 0 ? 10000 : static_cast<int>(static_cast<long double>(done) * 10000 / total_);
    if (hundredths == last_hundredths_) {
        return;
    }
    last_hundredths_ = hundredths;
    fmt::print(stderr, "\r    ({}.{:02}/100%)", hundredths / 100, hundredths % 100);
    std::fflush(stderr);
}

std::function<void(std::uint64_t, std::uint64_t)> Progress::callback() {
    return [this](std::uint64_t done, std::uint64_t total) {
        total_ = total;
        update(done);
    };
}

void Progress::finish() {
    if (enabled_) {
        update(total_);
        fmt::print(stderr, "\n");
    }
}

bool write_all(int fd, const void* data, std::size_t length) {
    const char* p = static_cast<const char*>(data);
    while (length > 0) {
        ssize_t n = ::write(fd, p, length);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        if (n == 0) { // no progress and no errno of its own: fail rather than spin
            errno = EIO;
            return false;
        }
        p += n;
        length -= static_cast<std::size_t>(n);
    }
    return true;
}

} // namespace qcowmap::cli
