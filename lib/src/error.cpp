// The one error type's names and its one errno mapping (qcowmap/result.hpp).
#include <qcowmap/result.hpp>

#include <cerrno>

namespace qcowmap {

std::string_view to_string(ErrorCode code) {
    switch (code) {
    case ErrorCode::io_error:
        return "io_error";
    case ErrorCode::not_qcow2:
        return "not_qcow2";
    case ErrorCode::unsupported_version:
        return "unsupported_version";
    case ErrorCode::invalid_header:
        return "invalid_header";
    case ErrorCode::unsupported_feature:
        return "unsupported_feature";
    case ErrorCode::encrypted:
        return "encrypted";
    case ErrorCode::invalid_table:
        return "invalid_table";
    case ErrorCode::invalid_cluster:
        return "invalid_cluster";
    case ErrorCode::compressed_data:
        return "compressed_data";
    case ErrorCode::out_of_range:
        return "out_of_range";
    case ErrorCode::invalid_argument:
        return "invalid_argument";
    case ErrorCode::checksum_mismatch:
        return "checksum_mismatch";
    case ErrorCode::image_in_use:
        return "image_in_use";
    case ErrorCode::image_changed:
        return "image_changed";
    }
    return "unknown";
}

std::string_view to_string(ErrorOrigin origin) {
    switch (origin) {
    case ErrorOrigin::none:
        return "none";
    case ErrorOrigin::image:
        return "image";
    case ErrorOrigin::backing:
        return "backing";
    case ErrorOrigin::data_file:
        return "data_file";
    case ErrorOrigin::target:
        return "target";
    }
    return "unknown";
}

std::string_view to_string(Refusal refusal) {
    switch (refusal) {
    case Refusal::none:
        return "none";
    case Refusal::untrusted:
        return "untrusted";
    case Refusal::no_data_file_name:
        return "no_data_file_name";
    case Refusal::backing_chain_loop:
        return "backing_chain_loop";
    case Refusal::backing_chain_depth:
        return "backing_chain_depth";
    case Refusal::out_of_memory:
        return "out_of_memory";
    }
    return "unknown";
}

int to_errno(const Error& error) {
    if (error.refusal == Refusal::out_of_memory)
        return ENOMEM;
    // The output's own errno (ENOSPC, EPIPE...) is what a caller writing it can act on; a
    // source file that cannot be read stays EIO, like a disk with bad sectors.
    if (error.origin == ErrorOrigin::target && error.system_errno != 0)
        return error.system_errno;
    switch (error.code) {
    case ErrorCode::unsupported_version:
    case ErrorCode::unsupported_feature:
    case ErrorCode::encrypted:
        return ENOTSUP;
    case ErrorCode::not_qcow2:
    case ErrorCode::invalid_header:
    case ErrorCode::out_of_range:
    case ErrorCode::invalid_argument:
        return EINVAL;
    case ErrorCode::image_in_use:
        return EAGAIN; // what qemu's lock test returns (qemu_lock_fd_test)
    case ErrorCode::io_error:
    case ErrorCode::invalid_table:
    case ErrorCode::invalid_cluster:
    case ErrorCode::compressed_data:
    case ErrorCode::checksum_mismatch:
    case ErrorCode::image_changed:
        return EIO;
    }
    return EIO;
}

} // namespace qcowmap
