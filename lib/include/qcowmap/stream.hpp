// qcowmap — the virtual disk as a Boost.Iostreams device.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>

#include <boost/iostreams/categories.hpp>
#include <boost/iostreams/positioning.hpp>

#include <algorithm>
#include <cstdint>
#include <ios>
#include <span>
#include <string>

namespace qcowmap {

/// A Boost.Iostreams Seekable Source over an image's virtual disk.
///
/// \code
///   boost::iostreams::stream<qcowmap::Source> in(image);   // a std::istream
///   in.seekg(1 << 20);
///   in.read(buffer, sizeof buffer);
///   boost::iostreams::copy(in, std::cout);                 // or through filters (gzip...)
/// \endcode
/// Each `read` is one `Image::read` straight into the stream's buffer: no other copy. The
/// device holds a copy of the `Image` (cheap; it shares the mapping), so it may outlive the
/// `Image` it was made from. Copies of a Source share the image but not the position.
///
/// Errors: a read that meets a corrupt table or compressed cluster throws
/// `std::ios_base::failure` carrying the library's message, which the stream turns into
/// `badbit` (or rethrows, if its exceptions mask asks for that). Seeking before the start or
/// past the end throws `std::ios_base::failure` too (the stream's seekg then fails); seeking
/// exactly to the end is allowed and reads then report end of stream.
class Source {
  public:
    using char_type = char;
    struct category : boost::iostreams::input_seekable, boost::iostreams::device_tag {};

    /// A source positioned at offset 0 of `image`'s virtual disk.
    explicit Source(Image image) : image_(std::move(image)) {}

    /// Reads up to `n` bytes at the current position. Returns the count, or -1 at the end.
    std::streamsize read(char* s, std::streamsize n) {
        const std::uint64_t size = image_.size();
        if (n <= 0) {
            return 0;
        }
        if (position_ >= size) {
            return -1;
        }
        const std::uint64_t want =
            std::min<std::uint64_t>(static_cast<std::uint64_t>(n), size - position_);
        auto copied = image_.read(
            std::span<std::byte>(reinterpret_cast<std::byte*>(s), static_cast<std::size_t>(want)),
            position_);
        if (!copied) {
            throw std::ios_base::failure(copied.error().message);
        }
        position_ += *copied;
        return static_cast<std::streamsize>(*copied);
    }

    /// Moves the position by `off` relative to `way` (beg, cur or end) and returns it.
    /// Throws std::ios_base::failure for a target before 0 or past the end of the disk.
    std::streampos seek(boost::iostreams::stream_offset off, std::ios_base::seekdir way) {
        const std::uint64_t size = image_.size();
        std::uint64_t base = 0;
        if (way == std::ios_base::cur) {
            base = position_;
        } else if (way == std::ios_base::end) {
            base = size;
        }
        std::uint64_t target = 0;
        if (off < 0) {
            const auto back = static_cast<std::uint64_t>(-(off + 1)) + 1; // no overflow at min
            if (back > base) {
                throw std::ios_base::failure("qcowmap::Source: seek before the start of the disk");
            }
            target = base - back;
        } else {
            const auto forward = static_cast<std::uint64_t>(off);
            if (forward > size - std::min(base, size)) {
                throw std::ios_base::failure("qcowmap::Source: seek past the end of the disk (" +
                                             std::to_string(size) + " bytes)");
            }
            target = base + forward;
        }
        position_ = target;
        return boost::iostreams::offset_to_position(
            static_cast<boost::iostreams::stream_offset>(target));
    }

    /// The image read by this source.
    const Image& image() const { return image_; }

  private:
    Image image_;
    std::uint64_t position_ = 0;
};

} // namespace qcowmap
