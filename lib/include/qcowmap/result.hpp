// qcowmap — the one error type of the library.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <cassert>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace qcowmap {

/// What went wrong, coarsely; the message says exactly what and names the offending value.
enum class ErrorCode {
    io_error,            ///< the file could not be opened, mapped or written (errno-style cause)
    not_qcow2,           ///< the file is not a qcow2 image (bad magic, empty, a directory...)
    unsupported_version, ///< a version this build cannot read
    invalid_header,      ///< a header field or header extension breaks the spec or qemu's limits
    unsupported_feature, ///< a valid image using a feature this build does not read
    encrypted,           ///< encrypted images are not supported
    invalid_table,     ///< an L1/L2/refcount/snapshot/bitmap table is malformed or out of the file
    invalid_cluster,   ///< a cluster descriptor is malformed (unaligned, reserved bits, past EOF)
    compressed_data,   ///< a compressed cluster could not be decompressed to exactly one cluster
    out_of_range,      ///< a requested virtual offset lies beyond the end of the disk
    invalid_argument,  ///< an argument given by the caller is not acceptable
    checksum_mismatch, ///< streamed bytes do not have the digest they were expected to have
    /// Another process uses the image in a way that excludes this use: QEMU's image locks
    /// (a writer holds it; see OpenOptions::force_share)
    image_in_use,
    /// A file of the image changed while it was being read (someone wrote to it: the result
    /// may mix two states; see Image::changed_since_open)
    image_changed,
};

/// A stable, lowercase name for an error code ("invalid_header"...), for JSON and logs.
std::string_view to_string(ErrorCode code);

/// Which file an error is about.
enum class ErrorOrigin : std::uint8_t {
    none,      ///< no file: the caller's arguments, or not known
    image,     ///< the image itself (the top layer of its chain)
    backing,   ///< a layer of the backing chain (`Error::depth` says which)
    data_file, ///< an external data file (of the layer `Error::depth`)
    target,    ///< the output being written (export, convert), not the source
};

/// A stable, lowercase name for an origin ("image", "backing", "data_file", "target", "none").
std::string_view to_string(ErrorOrigin origin);

/// The specific refusal behind an error, where callers act on it; none for the rest (the code
/// and message say what is wrong).
enum class Refusal : std::uint8_t {
    none,
    untrusted,           ///< OpenOptions::untrusted refused a name (message ends in " (untrusted)")
    no_data_file_name,   ///< the external data file bit is set but no data file is named
    backing_chain_loop,  ///< the backing chain reaches a layer twice
    backing_chain_depth, ///< the backing chain is deeper than kMaxChainLayers
    out_of_memory,       ///< an allocation failed
};

/// A stable, lowercase name for a refusal ("untrusted", "backing_chain_loop"...; "none").
std::string_view to_string(Refusal refusal);

/// What a step failed at, where a caller's answer depends on it (qemu-img compare exits 3 for
/// a failed allocation walk, 4 for a failed read).
enum class ErrorStage : std::uint8_t {
    unspecified,
    map,  ///< walking an allocation map (L1/L2 tables and what they point at)
    read, ///< reading or decompressing data the map pointed at
};

/// An error: a code to branch on, a one-line human message, and where it came from. Callers
/// decide on the fields, never on the message's text (its wording may change).
struct Error {
    ErrorCode code;
    std::string message;
    /// Which file the error is about; `path` names it when known.
    ErrorOrigin origin = ErrorOrigin::none;
    /// backing: the layer (1 = the image's backing file, 2 = its backing file...);
    /// data_file: the layer whose data file it is (0 = the image's).
    std::uint32_t depth = 0;
    /// The file of `origin` as opened (empty for images in memory and unnamed targets).
    std::string path = {};
    /// True when `message` begins with "PATH: ", so a caller printing "FILE: message" need not
    /// name the file again.
    bool message_names_path = false;
    Refusal refusal = Refusal::none;
    ErrorStage stage = ErrorStage::unspecified;
    /// The errno of the failed system call behind an io_error, when there is one; else 0.
    int system_errno = 0;
};

/// The one errno for an error, as the C API, the nbdkit plugin and Python's qcowmap.Error give
/// it: ENOMEM for out of memory; the system call's errno for a failed output; ENOTSUP for
/// unsupported versions, features, encryption and refused untrusted names; EINVAL for what is not
/// qcow2, a bad header, an offset beyond the disk and a bad argument; EAGAIN for an image in
/// use (what qemu's lock test returns); EIO for the rest (a damaged table or cluster reads like
/// a bad sector).
int to_errno(const Error& error);

/// The result of an operation that can fail: either a T or an Error.
///
/// Shaped like C++23's std::expected (which g++ 12 lacks in C++20): test with `if (result)`,
/// read with `*result` / `result->`, and on failure read `result.error()`.
template <typename T> class [[nodiscard]] Result {
  public:
    Result(T value) : storage_(std::in_place_index<0>, std::move(value)) {}
    Result(Error error) : storage_(std::in_place_index<1>, std::move(error)) {}

    bool has_value() const { return storage_.index() == 0; }
    explicit operator bool() const { return has_value(); }

    T& value() & {
        assert(has_value());
        return std::get<0>(storage_);
    }
    const T& value() const& {
        assert(has_value());
        return std::get<0>(storage_);
    }
    T&& value() && {
        assert(has_value());
        return std::get<0>(std::move(storage_));
    }
    T& operator*() & { return value(); }
    const T& operator*() const& { return value(); }
    T&& operator*() && { return std::move(*this).value(); }
    T* operator->() { return &value(); }
    const T* operator->() const { return &value(); }

    const Error& error() const& {
        assert(!has_value());
        return std::get<1>(storage_);
    }
    Error&& error() && {
        assert(!has_value());
        return std::get<1>(std::move(storage_));
    }

  private:
    std::variant<T, Error> storage_;
};

/// Result of an operation that yields nothing but may fail.
template <> class [[nodiscard]] Result<void> {
  public:
    Result() = default;
    Result(Error error) : error_(std::move(error)), failed_(true) {}

    bool has_value() const { return !failed_; }
    explicit operator bool() const { return has_value(); }
    const Error& error() const& {
        assert(failed_);
        return error_;
    }
    Error&& error() && {
        assert(failed_);
        return std::move(error_);
    }

  private:
    Error error_{ErrorCode::io_error, {}};
    bool failed_ = false;
};

} // namespace qcowmap
