#include "support.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sys/wait.h>

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
    auto slurp = [](const std::string& path) {
        std::ifstream in(path, std::ios::binary);
        return std::string(std::istreambuf_iterator<char>(in), {});
    };
    result.out = slurp(out_path);
    result.err = slurp(err_path);
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

std::vector<std::byte> read_file(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), {});
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
