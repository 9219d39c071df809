// Fuzz target: untrusted reference resolution. The input is a backing file name as an image
// would store it; it is resolved from a fixed directory tree (files, subdirectories, symlinks
// inside and out, a loop, a FIFO) by both methods (openat2 RESOLVE_BENEATH and the O_NOFOLLOW
// component walk). Invariants, checked on every input (a violation traps):
//  - both methods agree on whether the name opens;
//  - an opened file is a regular file whose real path lies inside the image's directory;
//  - a refusal is an unsupported_feature error ending in the untrusted mark, or an io_error.
#include "references.hpp"

#include <qcowmap/references.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;

struct Tree {
    fs::path root;    // the image's directory
    fs::path outside; // a sibling the names must never reach
    std::string root_real;
};

fs::path g_base; // removed at exit

const Tree& tree() {
    static const Tree t = [] {
        std::string pattern = (fs::temp_directory_path() / "qcowmap-fuzz-refs-XXXXXX").string();
        const char* made = ::mkdtemp(pattern.data());
        if (!made)
            std::abort();
        Tree out;
        const fs::path base = made;
        g_base = base;
        std::atexit([] {
            std::error_code ignored;
            fs::remove_all(g_base, ignored);
        });
        out.root = base / "images";
        out.outside = base / "outside";
        fs::create_directories(out.root / "sub" / "deeper");
        fs::create_directories(out.outside);
        auto file = [](const fs::path& p) { std::ofstream(p) << "data"; };
        file(out.root / "a.raw");
        file(out.root / "sub" / "b.raw");
        file(out.root / "sub" / "deeper" / "c.raw");
        file(out.outside / "secret.raw");
        fs::create_symlink("a.raw", out.root / "link-in");
        fs::create_symlink("../a.raw", out.root / "sub" / "up-in");
        fs::create_symlink("../outside/secret.raw", out.root / "link-out");
        fs::create_symlink("../../outside/secret.raw", out.root / "sub" / "up-out");
        fs::create_symlink((out.outside / "secret.raw").string(), out.root / "abs");
        fs::create_symlink("/proc/self/environ", out.root / "proc");
        fs::create_symlink("loop2", out.root / "loop1");
        fs::create_symlink("loop1", out.root / "loop2");
        fs::create_symlink("sub", out.root / "dirlink");
        ::mkfifo((out.root / "fifo").c_str(), 0600);
        out.root_real = fs::canonical(out.root).string() + "/";
        return out;
    }();
    return t;
}

/// The real path of an open descriptor.
std::string real_path(int fd) {
    std::error_code ec;
    return fs::read_symlink("/proc/self/fd/" + std::to_string(fd), ec).string();
}

void verify(const qcowmap::Result<qcowmap::detail::ConfinedFile>& r) {
    if (r) {
        struct stat st {};
        if (::fstat(r->fd, &st) != 0 || !S_ISREG(st.st_mode))
            __builtin_trap();
        if (!real_path(r->fd).starts_with(tree().root_real))
            __builtin_trap(); // escaped the image's directory
        return;
    }
    const qcowmap::Error& e = r.error();
    // A refusal says so in its field, and its message still ends in the mark.
    const bool refusal = e.code == qcowmap::ErrorCode::unsupported_feature &&
                         e.refusal == qcowmap::Refusal::untrusted &&
                         e.message.ends_with(qcowmap::kUntrustedRefusalMark);
    if (!refusal && e.code != qcowmap::ErrorCode::io_error)
        __builtin_trap();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size > 4096)
        return 0;
    const std::string name(reinterpret_cast<const char*>(data), size);
    const fs::path image = tree().root / "vm.qcow2";
    auto beneath = qcowmap::detail::open_confined(image, name, qcowmap::ErrorOrigin::backing,
                                                  qcowmap::detail::ConfineMethod::automatic);
    auto walk = qcowmap::detail::open_confined(image, name, qcowmap::ErrorOrigin::backing,
                                               qcowmap::detail::ConfineMethod::walk);
    verify(beneath);
    verify(walk);
    if (beneath.has_value() != walk.has_value())
        __builtin_trap(); // the two methods disagree
    if (beneath)
        ::close(beneath->fd);
    if (walk)
        ::close(walk->fd);
    return 0;
}
