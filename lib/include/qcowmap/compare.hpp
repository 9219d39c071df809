// qcowmap — compare two virtual disks the way `qemu-img compare` does.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/image.hpp>
#include <qcowmap/result.hpp>

#include <cstdint>
#include <functional>

namespace qcowmap {

struct CompareOptions {
    /// Like `qemu-img compare -s`: the sizes must be equal and, range by range, the allocation
    /// status too (allocated or not, zero or data, readable at a host offset or not, and
    /// whether the range runs to the end of the disk — qemu compares its block-status flags,
    /// BDRV_BLOCK_EOF included).
    bool strict = false;
    /// How data is taken from the files: compared straight from both mappings, made present
    /// ahead by the threads and dropped once compared, or read in pieces of 1 MiB into
    /// buffers; by default whichever costs less on this machine (automatic_data_access()).
    DataAccess data_access = DataAccess::automatic;
    /// Worker threads making mapped data present, reading pieces and decompressing clusters
    /// ahead of the comparison, which runs on the calling thread. 0: one per core, except when
    /// the files of both images hold less than 128 MiB between them (there threads cost more
    /// than they save: the calling thread starts alone, and the threads join only once 8 MiB
    /// of compressed clusters were decompressed); 1: all on the calling thread.
    unsigned threads = 0;
    /// Called on the calling thread as the comparison advances: bytes compared so far, and the
    /// larger disk's size (a tail past the shorter disk is checked for zeros last).
    std::function<void(std::uint64_t done, std::uint64_t total)> progress;
};

/// What `compare_images` found.
struct CompareResult {
    enum class Outcome {
        identical,        ///< "Images are identical."
        content_mismatch, ///< "Content mismatch at offset N!"
        size_mismatch,    ///< strict only: "Strict mode: Image size mismatch!"
        status_mismatch,  ///< strict only: "Strict mode: Offset N block status mismatch!"
    };
    Outcome outcome = Outcome::identical;
    /// content_mismatch: start of the first differing 512-byte sector, as qemu-img reports it.
    /// status_mismatch: start of the first range whose status differs.
    std::uint64_t offset = 0;
    /// The sizes differ and the common part matched (qemu-img then prints
    /// "Warning: Image size mismatch!" before checking that the longer disk's tail is zero).
    bool size_warning = false;
};

/// Compares the disks of `a` and `b` like `qemu-img compare`: by default unallocated and zero
/// ranges compare equal to zeros, and a size difference is fine when the longer disk's tail
/// reads as zeros. Both extent iterators are walked together: ranges that are zero on both
/// sides, and data ranges that are the same bytes of the same file, are skipped without
/// reading; the rest is compared straight from the mappings or piece by piece as read (see
/// `data_access`). Memory stays bounded whatever the disk sizes: about 4 MiB per worker thread
/// (4 jobs of up to 1 MiB of read or decompressed bytes each). Errors: those of either image,
/// with ErrorOrigin::image and the image's path (unless the error names another origin) and
/// their stage: ErrorStage::map for a walk of an allocation map that failed, ErrorStage::read
/// for data that could not be read or decompressed (qemu-img compare exits 3 and 4 for them).
Result<CompareResult> compare_images(const Image& a, const Image& b,
                                     const CompareOptions& options = {});

} // namespace qcowmap
