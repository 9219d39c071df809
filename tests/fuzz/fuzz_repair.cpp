// Fuzz target: `check -r all` in place over arbitrary bytes (refcount rebuilds, OFLAG_COPIED and
// L2 entry fixes, new refcount blocks). The bytes are written to a scratch file and repaired;
// whatever the repair reports, it must not crash; a refusal that says nothing was written must
// leave the file as it was; and an image it leaves clean must stay clean: repairing it again
// finds nothing to fix.
#include <qcowmap/check.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string path = (std::filesystem::temp_directory_path() / "fuzz_repair.XXXXXX").string();
    const int fd = ::mkstemp(path.data());
    if (fd < 0)
        return 0;
    bool written = true;
    for (std::size_t done = 0; done < size;) {
        const ssize_t n = ::write(fd, data + done, size - done);
        if (n <= 0) {
            written = false;
            break;
        }
        done += static_cast<std::size_t>(n);
    }
    ::close(fd);
    if (written) {
        qcowmap::RepairOptions options;
        options.mode = qcowmap::RepairMode::all;
        options.max_messages = 16;
        options.untrusted = true; // backing file names come from the fuzz input
        auto first = qcowmap::repair_image(path, options);
        if (!first && first.error().message.find("nothing written") != std::string::npos) {
            std::FILE* in = std::fopen(path.c_str(), "rb");
            std::vector<std::uint8_t> now(size + 1);
            const std::size_t got = in ? std::fread(now.data(), 1, now.size(), in) : 0;
            if (in)
                std::fclose(in);
            if (got != size || !std::equal(data, data + size, now.begin())) {
                std::fprintf(stderr,
                             "fuzz_repair: refused with nothing written, yet the file "
                             "changed: %s\n",
                             first.error().message.c_str());
                std::abort();
            }
        }
        if (first && first->exit_code() == 0) {
            auto again = qcowmap::repair_image(path, options);
            if (!again || again->exit_code() != 0 || again->leaks_fixed != 0 ||
                again->corruptions_fixed != 0) {
                std::fprintf(stderr, "fuzz_repair: a repaired image needed repairing again: %s\n",
                             again ? "fixes made" : again.error().message.c_str());
                std::abort();
            }
        }
    }
    ::unlink(path.c_str());
    return 0;
}
