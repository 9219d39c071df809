#include "cli.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <map>
#include <thread>
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

int finish_stdout() {
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
        return report("<stdout>", std::strerror(errno ? errno : EIO), kExitOutputError);
    }
    return kExitOk;
}

void ImageArgs::add_to(CLI::App& command, bool contents) {
    command.add_option("IMAGE", path, "qcow2 image file")->required();
    command
        .add_option("--backing", backing,
                    "follow: read through the backing chain (default); none: read only this "
                    "image, unallocated ranges read as zeros")
        ->check(CLI::IsMember({"follow", "none"}));
    if (contents) {
        command.add_option("--data-file", data_file,
                           "External data file to use instead of the one the image names");
        command.add_option("--snapshot", snapshot,
                           "Read this internal snapshot (ID or name) instead of the active disk");
    }
}

OpenOptions ImageArgs::open_options() const {
    OpenOptions options;
    options.backing = backing == "none" ? BackingMode::none : BackingMode::follow;
    if (!data_file.empty())
        options.data_file = data_file;
    if (!snapshot.empty())
        options.snapshot = snapshot;
    return options;
}

void add_io_option(CLI::App& command, DataAccess& access) {
    command
        .add_option("--io", access,
                    "How data is taken from the file: mmap (straight from the mapping, no "
                    "copy), read (pread into a small buffer) or auto (the default: whichever "
                    "costs less on this machine, measured at start). convert -S 0 copies "
                    "inside the kernel either way")
        ->transform(CLI::CheckedTransformer(
            std::map<std::string, DataAccess>{{"auto", DataAccess::automatic},
                                              {"read", DataAccess::read},
                                              {"mmap", DataAccess::mapping}}))
        ->option_text("auto|read|mmap");
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
    struct sigaction action {};
    action.sa_handler = on_sigbus;
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGBUS, &action, nullptr);
}

std::optional<Image> open_or_report(const ImageArgs& args) {
    guard_against_shrinking(args.path);
    auto image = Image::open(args.path, args.open_options());
    if (!image) {
        report(args.path, image.error().message, kExitImageError);
        return std::nullopt;
    }
    return std::move(*image);
}

std::optional<std::uint64_t> parse_size(std::string_view text) {
    if (text.empty()) {
        return std::nullopt;
    }
    std::uint64_t value = 0;
    std::size_t i = 0;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
        std::uint64_t digit = static_cast<std::uint64_t>(text[i] - '0');
        if (value > (UINT64_MAX - digit) / 10) {
            return std::nullopt;
        }
        value = value * 10 + digit;
    }
    if (i == 0) {
        return std::nullopt;
    }
    std::string_view suffix = text.substr(i);
    unsigned shift = 0;
    if (suffix.empty() || suffix == "B" || suffix == "b") {
        shift = 0;
    } else if (suffix.size() <= 3) {
        switch (suffix[0]) {
        case 'k':
        case 'K':
            shift = 10;
            break;
        case 'm':
        case 'M':
            shift = 20;
            break;
        case 'g':
        case 'G':
            shift = 30;
            break;
        case 't':
        case 'T':
            shift = 40;
            break;
        case 'p':
        case 'P':
            shift = 50;
            break;
        case 'e':
        case 'E':
            shift = 60;
            break;
        default:
            return std::nullopt;
        }
        std::string_view rest = suffix.substr(1);
        if (!(rest.empty() || rest == "B" || rest == "iB" || rest == "i")) {
            return std::nullopt;
        }
    } else {
        return std::nullopt;
    }
    if (shift && value > (UINT64_MAX >> shift)) {
        return std::nullopt;
    }
    return value << shift;
}

std::string json_string(std::string_view text) {
    std::string out = "\"";
    for (char c : text) {
        auto u = static_cast<unsigned char>(c);
        switch (c) {
        case '"':
            out += "\\\"";
            break;
        case '\\':
            out += "\\\\";
            break;
        case '\n':
            out += "\\n";
            break;
        case '\r':
            out += "\\r";
            break;
        case '\t':
            out += "\\t";
            break;
        default:
            if (u < 0x20 || u == 0x7f) {
                out += fmt::format("\\u{:04x}", u);
            } else {
                out += c;
            }
        }
    }
    out += '"';
    return out;
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

void Progress::finish() {
    if (enabled_) {
        update(total_);
        fmt::print(stderr, "\n");
    }
}

unsigned worker_threads() {
    unsigned cores = std::thread::hardware_concurrency();
    return cores == 0 ? 2 : cores;
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
        p += n;
        length -= static_cast<std::size_t>(n);
    }
    return true;
}

} // namespace qcowmap::cli
