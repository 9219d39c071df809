// QEMU's image locks for the in-place writer, kept behind one function until the shared
// image-lock module (issue 25) lands; then this file calls it.
#pragma once

#include <qcowmap/result.hpp>

#include <string_view>

namespace qcowmap::detail {

/// Takes the locks qemu's file driver takes on an image it opens for writing (block/file-posix.c
/// raw_apply_lock_bytes: OFD read locks on byte 100 + n for each permission n it holds and on
/// byte 200 + n for each it does not share): consistent read, write and resize held; write and
/// resize not shared. Fails with io_error naming the permission when another process (a VM,
/// qemu-io, qemu-img) holds or refuses one of them. The locks live as long as the open file
/// description of `fd` (closing it releases them).
Result<void> lock_for_writing(int fd, std::string_view name);

} // namespace qcowmap::detail
