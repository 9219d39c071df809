// Fuzz target: the consistency check over arbitrary bytes (every table it walks, refcount
// widths 1..64 bits, references past the end of the file).
#include <qcowmap/check.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    qcowmap::CheckOptions options;
    options.max_messages = 16;
    auto result = qcowmap::check_image(bytes, options);
    if (result) {
        (void)result->exit_code();
    }
    return 0;
}
