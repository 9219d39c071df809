#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

namespace qcowmap::test {

TempDir::TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "qcowmap-test-XXXXXX").string();
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    if (!::mkdtemp(buffer.data())) {
        throw std::runtime_error("mkdtemp failed");
    }
    path_ = buffer.data();
}

TempDir::~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
}

std::string shell_quote(const std::string& text) {
    std::string out = "'";
    for (char c : text) {
        if (c == '\'') {
            out += "'\\''";
        } else {
            out += c;
        }
    }
    return out + "'";
}

std::string read_text(const std::filesystem::path& path) {
    // In 64 KiB blocks: an istreambuf_iterator copies byte by byte, which took a minute per
    // 128 MiB of captured output in the unoptimised sanitizer build.
    std::ifstream in(path, std::ios::binary);
    std::string text;
    std::vector<char> block(64 * 1024);
    while (in.read(block.data(), static_cast<std::streamsize>(block.size())) || in.gcount() > 0)
        text.append(block.data(), static_cast<std::size_t>(in.gcount()));
    return text;
}

CommandResult run(const std::string& command) {
    TempDir scratch;
    std::string out_path = (scratch / "out").string();
    std::string err_path = (scratch / "err").string();
    std::string full =
        "{ " + command + " ; } >" + shell_quote(out_path) + " 2>" + shell_quote(err_path);
    int status = std::system(full.c_str());
    CommandResult result;
    if (status != -1 && WIFEXITED(status)) {
        result.exit_code = WEXITSTATUS(status);
    } else if (status != -1 && WIFSIGNALED(status)) {
        result.exit_code = 128 + WTERMSIG(status);
    }
    result.out = read_text(out_path);
    result.err = read_text(err_path);
    return result;
}

std::string run_ok(const std::string& command) {
    CommandResult r = run(command);
    if (r.exit_code != 0) {
        ADD_FAILURE() << "command failed (exit " << r.exit_code << "): " << command << "\n"
                      << r.err;
    }
    return r.out;
}

std::string qcowmap_bin() {
    const char* bin = std::getenv("QCOWMAP_BIN");
    return bin ? bin : "qcowmap";
}

std::string cli() {
    return shell_quote(qcowmap_bin());
}

std::string q(const std::filesystem::path& path) {
    return shell_quote(path.string());
}

std::vector<std::byte> read_file(const std::filesystem::path& path) {
    const std::string text = read_text(path);
    std::vector<std::byte> bytes(text.size());
    std::memcpy(bytes.data(), text.data(), text.size());
    return bytes;
}

void write_file(const std::filesystem::path& path, const std::vector<std::byte>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::byte> qemu_raw(const std::filesystem::path& image, const TempDir& dir) {
    static int counter = 0;
    auto raw = dir / ("qemu-raw-" + std::to_string(counter++) + ".raw");
    run_ok("qemu-img convert -O raw " + shell_quote(image.string()) + " " +
           shell_quote(raw.string()));
    auto bytes = read_file(raw);
    std::filesystem::remove(raw);
    return bytes;
}

void make_image(const std::filesystem::path& path, const std::string& options,
                const std::string& size, const std::vector<std::string>& io_commands) {
    std::string create = "qemu-img create -q -f qcow2 ";
    if (!options.empty()) {
        create += "-o " + shell_quote(options) + " ";
    }
    run_ok(create + shell_quote(path.string()) + " " + size);
    if (!io_commands.empty()) {
        std::string io = "qemu-io -f qcow2";
        for (const std::string& c : io_commands) {
            io += " -c " + shell_quote(c);
        }
        // qemu-io exits 0 even when a command fails: look at what it said.
        CommandResult r = run(io + " " + shell_quote(path.string()));
        if (r.exit_code != 0 || r.out.find("failed") != std::string::npos ||
            r.err.find("failed") != std::string::npos) {
            ADD_FAILURE() << "qemu-io failed on " << path << ": " << r.out << r.err;
        }
    }
}

void point_cluster_past_eof(const std::filesystem::path& image, std::uint64_t cluster) {
    std::vector<std::byte> bytes = read_file(image);
    auto be64 = [&](std::size_t at) {
        std::uint64_t v = 0;
        for (int i = 0; i < 8; ++i)
            v = v << 8 | std::to_integer<std::uint64_t>(bytes.at(at + i));
        return v;
    };
    // Header bytes 40-47: L1 table offset; L1/L2 entries keep their offset in bits 9-55.
    const std::uint64_t l2 = be64(be64(40)) & 0x00fffffffffffe00ull;
    const std::uint64_t entry = 0x8000000000000000ull | 0x40000000000ull;
    for (int i = 0; i < 8; ++i) {
        bytes.at(l2 + cluster * 8 + i) = static_cast<std::byte>(entry >> (56 - 8 * i));
    }
    write_file(image, bytes);
}

void make_luks_image(const std::filesystem::path& path, const std::string& size) {
    const std::string create = "qemu-img create -q -f qcow2 --object secret,id=s,data=PASS -o "
                               "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=100 " +
                               shell_quote(path.string()) + " " + size;
    CommandResult last;
    for (int attempt = 0; attempt < 10; ++attempt) {
        last = run(create);
        if (last.exit_code == 0)
            return;
    }
    ADD_FAILURE() << "qemu-img could not create a LUKS image: " << last.err;
}

} // namespace qcowmap::test

namespace qcowmap::test {

void poke(const std::filesystem::path& path, std::uint64_t offset, const std::string& bytes) {
    std::fstream file(path, std::ios::binary | std::ios::in | std::ios::out);
    if (!file) {
        throw std::runtime_error("poke: cannot open " + path.string());
    }
    file.seekp(static_cast<std::streamoff>(offset));
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!file) {
        throw std::runtime_error("poke: cannot write " + path.string());
    }
}

void put_be(Buffer& b, std::uint64_t at, std::uint64_t value, unsigned width) {
    for (unsigned i = 0; i < width; ++i) {
        b.at(at + i) = static_cast<std::byte>(value >> (8 * (width - 1 - i)));
    }
}
void put_u8(Buffer& b, std::uint64_t at, std::uint8_t value) {
    put_be(b, at, value, 1);
}
void put_be32(Buffer& b, std::uint64_t at, std::uint32_t value) {
    put_be(b, at, value, 4);
}
void put_be64(Buffer& b, std::uint64_t at, std::uint64_t value) {
    put_be(b, at, value, 8);
}
std::uint64_t get_be(const Buffer& b, std::uint64_t at, unsigned width) {
    std::uint64_t value = 0;
    for (unsigned i = 0; i < width; ++i) {
        value = (value << 8) | std::to_integer<std::uint64_t>(b.at(at + i));
    }
    return value;
}
std::uint32_t get_be32(const Buffer& b, std::uint64_t at) {
    return static_cast<std::uint32_t>(get_be(b, at, 4));
}
std::uint64_t get_be64(const Buffer& b, std::uint64_t at) {
    return get_be(b, at, 8);
}

void poke_be(const std::filesystem::path& path, std::uint64_t offset, std::uint64_t value,
             unsigned width) {
    std::string bytes(width, '\0');
    for (unsigned i = 0; i < width; ++i) {
        bytes[i] = static_cast<char>(value >> (8 * (width - 1 - i)));
    }
    poke(path, offset, bytes);
}

std::uint64_t peek_be(const std::filesystem::path& path, std::uint64_t offset, unsigned width) {
    std::ifstream file(path, std::ios::binary);
    file.seekg(static_cast<std::streamoff>(offset));
    std::string bytes(width, '\0');
    file.read(bytes.data(), width);
    if (!file) {
        throw std::runtime_error("peek: cannot read " + path.string());
    }
    std::uint64_t value = 0;
    for (char c : bytes) {
        value = value << 8 | static_cast<unsigned char>(c);
    }
    return value;
}

void set_header_extension(const std::filesystem::path& path, std::uint32_t type,
                          const std::optional<std::string>& data) {
    std::vector<std::byte> file = read_file(path);
    auto be = [&](std::size_t at, unsigned width) {
        std::uint64_t v = 0;
        for (unsigned i = 0; i < width; ++i)
            v = v << 8 | std::to_integer<std::uint64_t>(file.at(at + i));
        return v;
    };
    const std::uint64_t cluster_size = std::uint64_t{1} << be(20, 4);
    const std::uint64_t header_length = be(4, 4) >= 3 ? be(100, 4) : 72;
    const std::uint64_t backing_offset = be(8, 8);
    const std::uint64_t backing_size = be(16, 4);
    std::string backing_name;
    if (backing_offset != 0) {
        backing_name.assign(reinterpret_cast<const char*>(file.data()) + backing_offset,
                            backing_size);
    }
    // The extensions as they are, then the change.
    std::vector<std::pair<std::uint32_t, std::string>> extensions;
    for (std::uint64_t at = header_length; at + 8 <= cluster_size;) {
        const auto t = static_cast<std::uint32_t>(be(at, 4));
        const std::uint64_t length = be(at + 4, 4);
        if (t == 0)
            break;
        extensions.emplace_back(
            t, std::string(reinterpret_cast<const char*>(file.data()) + at + 8, length));
        at += 8 + ((length + 7) & ~std::uint64_t{7});
    }
    auto found = std::find_if(extensions.begin(), extensions.end(),
                              [&](const auto& e) { return e.first == type; });
    if (!data) {
        if (found != extensions.end())
            extensions.erase(found);
    } else if (found != extensions.end()) {
        found->second = *data;
    } else {
        extensions.emplace_back(type, *data);
    }
    std::string area;
    auto put = [&](std::uint64_t value, unsigned width) {
        for (unsigned i = 0; i < width; ++i)
            area += static_cast<char>(value >> (8 * (width - 1 - i)));
    };
    for (const auto& [t, bytes] : extensions) {
        put(t, 4);
        put(bytes.size(), 4);
        area += bytes;
        area.append((8 - bytes.size() % 8) % 8, '\0');
    }
    put(0, 8); // end of the extensions
    const std::uint64_t new_backing_offset = header_length + area.size();
    area += backing_name;
    if (header_length + area.size() > cluster_size) {
        throw std::runtime_error("set_header_extension: the extensions do not fit");
    }
    std::fill(file.begin() + static_cast<std::ptrdiff_t>(header_length),
              file.begin() +
                  static_cast<std::ptrdiff_t>(std::min<std::uint64_t>(cluster_size, file.size())),
              std::byte{0});
    std::memcpy(file.data() + header_length, area.data(), area.size());
    write_file(path, file);
    if (backing_offset != 0) {
        poke_be(path, 8, new_backing_offset, 8);
    }
}

EioMount::EioMount(const std::filesystem::path& source, const std::filesystem::path& mountpoint)
    : source_(source), mountpoint_(mountpoint) {
    const char* helper = std::getenv("QCOWMAP_EIO_FS");
    if (!helper || ::access("/dev/fuse", R_OK | W_OK) != 0)
        return;
    std::filesystem::create_directories(mountpoint);
    struct stat before {};
    ::stat(mountpoint.c_str(), &before);
    pid_ = ::fork();
    if (pid_ == 0) {
        ::execl(helper, helper, source.c_str(), mountpoint.c_str(), "-f", nullptr);
        ::_exit(127);
    }
    // Mounted once the mount point's device changes.
    for (int i = 0; i < 500 && pid_ > 0; ++i) {
        struct stat now {};
        if (::stat(mountpoint.c_str(), &now) == 0 && now.st_dev != before.st_dev) {
            mounted_ = true;
            return;
        }
        ::usleep(10000);
    }
}

EioMount::~EioMount() {
    if (pid_ > 0) {
        ::umount2(mountpoint_.c_str(), MNT_DETACH);
        ::kill(pid_, SIGTERM);
        int status = 0;
        ::waitpid(pid_, &status, 0);
    }
}

void EioMount::fail_reads(const std::string& name, std::uint64_t offset, std::uint64_t length) {
    const std::string line =
        name + " " + std::to_string(offset) + " " + std::to_string(length) + "\n";
    std::vector<std::byte> bytes(line.size());
    std::memcpy(bytes.data(), line.data(), line.size());
    write_file(source_ / ".eio", bytes);
}

std::string readme_script(const std::string& name) {
    const char* root = std::getenv("QCOWMAP_SOURCE_ROOT");
    if (!root)
        return {};
    const std::string readme = read_text(std::filesystem::path(root) / "README.md");
    const std::string open = "<!-- " + name + ":begin -->\n```sh\n";
    const auto begin = readme.find(open);
    const auto end = readme.find("```\n<!-- " + name + ":end -->");
    if (begin == std::string::npos || end == std::string::npos || end < begin + open.size())
        return {};
    return readme.substr(begin + open.size(), end - begin - open.size());
}

CommandResult run_script_in(const std::filesystem::path& dir, const std::string& script) {
    std::vector<std::byte> bytes(script.size());
    std::memcpy(bytes.data(), script.data(), script.size());
    write_file(dir / "example.sh", bytes);
    const std::string bin_dir = std::filesystem::absolute(qcowmap_bin()).parent_path().string();
    return run("cd " + q(dir) + " && PATH=" + shell_quote(bin_dir) +
               ":\"$PATH\" timeout -k 5 600 sh example.sh");
}

bool wait_for_writer_lock(const std::filesystem::path& image) {
    struct stat st {};
    if (::stat(image.c_str(), &st) != 0)
        return false;
    const std::string inode = ":" + std::to_string(st.st_ino) + " ";
    for (int i = 0; i < 600; ++i) {
        if (read_text("/proc/locks").find(inode) != std::string::npos)
            return run("qemu-img info " + q(image) + " >/dev/null 2>&1").exit_code != 0;
        ::usleep(50000);
    }
    return false;
}

QemuIoHolder::QemuIoHolder(const std::filesystem::path& image) {
    std::signal(SIGPIPE, SIG_IGN); // qemu-io may be gone when quit is written
    io_ = ::popen(("exec qemu-io -f qcow2 " + q(image) + " >/dev/null 2>&1").c_str(), "w");
    if (io_)
        held_ = wait_for_writer_lock(image);
}

QemuIoHolder::~QemuIoHolder() {
    if (!io_)
        return;
    std::fputs("quit\n", io_);
    ::pclose(io_);
}

} // namespace qcowmap::test
