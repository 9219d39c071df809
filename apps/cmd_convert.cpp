// qcowmap convert: a sparse raw copy of the virtual disk.
#include "cli.hpp"

#include <qcowmap/bitmap.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace qcowmap::cli {

extern const std::byte kZeroChunk[1 << 20];

namespace {

bool pwrite_all(int fd, const std::byte* data, std::uint64_t length, std::uint64_t offset) {
    while (length > 0) {
        // Bounded chunks keep progress responsive and stay below the kernel's per-call cap.
        std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(length, 1u << 30));
        ssize_t n = ::pwrite(fd, data, chunk, static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        data += n;
        offset += static_cast<std::uint64_t>(n);
        length -= static_cast<std::uint64_t>(n);
    }
    return true;
}

/// True when all `length` bytes are zero (memcmp against itself shifted by one is vectorised).
bool all_zero(const std::byte* data, std::size_t length) {
    return length == 0 || (data[0] == std::byte{0} && std::memcmp(data, data + 1, length - 1) == 0);
}

/// Writes a data run, leaving holes for the blocks of `block` bytes (aligned in the output)
/// that hold only zeros, as qemu-img convert does with its default -S 4k. Consecutive
/// non-zero blocks go out in one pwrite.
bool pwrite_sparse(int fd, const std::byte* data, std::uint64_t length, std::uint64_t offset,
                   std::uint64_t block) {
    if (block == 0) {
        return pwrite_all(fd, data, length, offset);
    }
    std::uint64_t pending_start = 0, pending_length = 0;
    for (std::uint64_t at = 0; at < length;) {
        std::uint64_t piece = std::min(length - at, block - (offset + at) % block);
        if (all_zero(data + at, static_cast<std::size_t>(piece))) {
            if (pending_length &&
                !pwrite_all(fd, data + pending_start, pending_length, offset + pending_start)) {
                return false;
            }
            pending_length = 0;
        } else {
            if (!pending_length)
                pending_start = at;
            pending_length += piece;
        }
        at += piece;
    }
    return !pending_length ||
           pwrite_all(fd, data + pending_start, pending_length, offset + pending_start);
}

/// Copies a data run of the image file inside the kernel (copy_file_range: no user-space copy,
/// and file systems with reflinks share the blocks), where zero detection is not wanted.
/// Falls back to pread/pwrite through `buffer` where the kernel cannot copy between the two.
enum class CopyResult { ok, output_failed, source_changed };

CopyResult copy_run(const FilePosition& from, int out, std::uint64_t offset, std::uint64_t length,
                    std::vector<std::byte>& buffer) {
    std::uint64_t host_offset = from.offset;
    std::uint64_t done = 0;
    while (done < length) {
        loff_t in_at = static_cast<loff_t>(host_offset + done);
        loff_t out_at = static_cast<loff_t>(offset + done);
        ssize_t n = ::copy_file_range(
            from.fd, &in_at, out, &out_at,
            static_cast<std::size_t>(std::min<std::uint64_t>(length - done, 1u << 30)), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; // not supported here (or EOF): finish with pread/pwrite
        done += static_cast<std::uint64_t>(n);
    }
    host_offset += done;
    offset += done;
    length -= done;
    if (length > 0 && buffer.empty())
        buffer.resize(1u << 20);
    while (length > 0) {
        std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(length, buffer.size()));
        ssize_t n = ::pread(from.fd, buffer.data(), want, static_cast<off_t>(host_offset));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            return CopyResult::source_changed; // the extent walk checked this range: it shrank
        }
        if (!pwrite_all(out, buffer.data(), static_cast<std::uint64_t>(n), offset)) {
            return CopyResult::output_failed;
        }
        host_offset += static_cast<std::uint64_t>(n);
        offset += static_cast<std::uint64_t>(n);
        length -= static_cast<std::uint64_t>(n);
    }
    return CopyResult::ok;
}

/// Writes one run of the disk to `out` at `offset`. A data run in the image's files is copied
/// inside the kernel when no zero detection is wanted (`zero_block` 0); otherwise the bytes
/// the visit produced (read into its buffer, decompressed, or from the mapping with --io=mmap)
/// are written with holes for all-zero blocks. Zero runs are left to the caller.
Result<void> write_run(const std::optional<FilePosition>& file, int out, std::uint64_t offset,
                       std::span<const std::byte> bytes, std::uint64_t zero_block,
                       std::vector<std::byte>& buffer, bool& write_failed) {
    if (zero_block == 0) {
        if (file) {
            CopyResult copied = copy_run(*file, out, offset, bytes.size(), buffer);
            if (copied == CopyResult::source_changed) {
                return Error{ErrorCode::io_error, kImageChanged};
            }
            if (copied == CopyResult::ok)
                return {};
            write_failed = true;
            return Error{ErrorCode::io_error, std::strerror(errno)};
        }
    }
    if (!pwrite_sparse(out, bytes.data(), bytes.size(), offset, zero_block)) {
        write_failed = true;
        return Error{ErrorCode::io_error, std::strerror(errno)};
    }
    return {};
}

/// Makes `[offset, offset + length)` of `fd` read as zeros: a punched hole where the file
/// system (or block device) supports it, else written zeros.
bool zero_out(int fd, std::uint64_t offset, std::uint64_t length) {
    if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0) {
        return true;
    }
    for (std::uint64_t done = 0; done < length;) {
        std::uint64_t n = std::min<std::uint64_t>(length - done, sizeof kZeroChunk);
        if (!pwrite_all(fd, kZeroChunk, n, offset + done))
            return false;
        done += n;
    }
    return true;
}

/// `convert --bitmap=NAME IMAGE TARGET`: an incremental sync. Only the ranges the bitmap marks
/// dirty are applied to TARGET, an existing raw copy of the same size: data runs are written,
/// zero runs punched (or zero-filled). Everything outside the dirty ranges is left alone.
int convert_incremental(const ImageArgs& args, const std::string& bitmap_name,
                        const std::string& output, bool show_progress) {
    auto image = open_or_report(args);
    if (!image)
        return static_cast<int>(kExitImageError);
    auto bitmap = DirtyBitmap::open(*image, bitmap_name);
    if (!bitmap) {
        return report(args.path, bitmap.error().message, kExitImageError);
    }
    int fd = ::open(output.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        std::string why = errno == ENOENT ? "does not exist (convert --bitmap updates an existing "
                                            "copy of the disk; make one with convert first)"
                                          : std::strerror(errno);
        return report(output, why, kExitOutputError);
    }
    auto fail_output = [&](const std::string& why) {
        ::close(fd);
        return report(output, why, kExitOutputError);
    };
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        return fail_output(std::strerror(errno));
    }
    if (image->maps_file(st.st_dev, st.st_ino)) {
        return fail_output("is the image being read (or one of its layers or its data file): "
                           "refusing to overwrite it");
    }
    std::uint64_t target_size = static_cast<std::uint64_t>(st.st_size);
    if (S_ISBLK(st.st_mode) && ::ioctl(fd, BLKGETSIZE64, &target_size) != 0) {
        return fail_output(std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        return fail_output("is neither a regular file nor a block device");
    }
    if (target_size != image->size()) {
        return fail_output(fmt::format("is {} bytes but the disk is {} bytes: an incremental "
                                       "update needs a copy of the same size",
                                       target_size, image->size()));
    }
    std::vector<std::byte> buffer;
    Progress meter(show_progress, bitmap->dirty_bytes());
    std::uint64_t done_before = 0;
    bool write_failed = false;
    auto visitor = [&](const Run& run) -> Result<void> {
        const std::uint64_t offset = run.offset;
        const std::uint64_t length = run.length;
        if (!run.bytes.empty()) {
            // Data is copied inside the kernel (runs carry their file positions).
            if (auto ok = write_run(run.file, fd, offset, run.bytes, 0, buffer, write_failed);
                !ok) {
                return ok;
            }
        } else if (!zero_out(fd, offset, length)) {
            write_failed = true;
            return Error{ErrorCode::io_error, std::strerror(errno)};
        }
        done_before += length;
        meter.update(done_before);
        return {};
    };
    Result<void> result;
    const VisitOptions visit{worker_threads(), DataAccess::mapping}; // reads /sys: once
    for (const BitmapRange& range : bitmap->dirty_ranges()) {
        result = image->visit(range.offset, range.offset + range.length, visitor, visit);
        if (!result)
            break;
    }
    if (!result) {
        ::close(fd);
        return write_failed ? report(output, result.error().message, kExitOutputError)
                            : report(args.path, result.error().message, kExitImageError);
    }
    if (::close(fd) != 0) {
        return report(output, std::strerror(errno), kExitOutputError);
    }
    meter.finish();
    return kExitOk;
}

} // namespace

Command add_convert(CLI::App& app) {
    auto* command = app.add_subcommand(
        "convert", "Write the virtual disk to a raw file; zero runs become holes (sparse)");
    auto args = std::make_shared<ImageArgs>();
    auto output = std::make_shared<std::string>();
    auto progress = std::make_shared<bool>(false);
    auto force = std::make_shared<bool>(false);
    args->add_to(*command);
    command->add_option("OUTPUT", *output, "raw output file (or block device)")->required();
    command->add_flag("-p,--progress", *progress, "Show progress on stderr");
    command->add_flag("-f,--force", *force, "Overwrite OUTPUT if it exists");
    auto sparse_size = std::make_shared<std::string>("4k");
    command->add_option("-S,--sparse-size", *sparse_size,
                        "Also leave holes for data blocks of this size that hold only zeros "
                        "(like qemu-img convert -S; default 4k, 0 disables)");
    auto io = std::make_shared<DataAccess>(DataAccess::automatic);
    add_io_option(*command, *io);
    auto bitmap = std::make_shared<std::string>();
    command->add_option("--bitmap", *bitmap,
                        "Incremental sync: apply only the ranges this dirty bitmap marks dirty "
                        "onto OUTPUT, an existing raw copy of the same size");
    return {
        command, [=] {
            if (!bitmap->empty()) {
                return convert_incremental(*args, *bitmap, *output, *progress);
            }
            auto zero_block = parse_size(*sparse_size);
            if (!zero_block || *zero_block % 512 != 0) {
                return report(args->path,
                              fmt::format("invalid --sparse-size '{}' (a multiple of 512, or 0)",
                                          *sparse_size),
                              kExitUsage);
            }
            auto image = open_or_report(*args);
            if (!image)
                return static_cast<int>(kExitImageError);
            // No O_TRUNC: the output may turn out to be the image itself (or one of its
            // layers), which must be refused before a single byte of it is lost.
            int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (*force ? 0 : O_EXCL);
            int fd = ::open(output->c_str(), flags, 0644);
            if (fd < 0) {
                std::string why = errno == EEXIST ? "already exists (use --force to overwrite)"
                                                  : std::strerror(errno);
                return report(*output, why, kExitOutputError);
            }
            struct stat st {};
            if (::fstat(fd, &st) != 0) {
                int error = errno;
                ::close(fd);
                return report(*output, std::strerror(error), kExitOutputError);
            }
            if (image->maps_file(st.st_dev, st.st_ino)) {
                ::close(fd);
                return report(*output,
                              "is the image being read (or one of its layers or "
                              "its data file): refusing to overwrite it",
                              kExitOutputError);
            }
            // A regular file gets its size up front so that zero runs stay holes; a device
            // (or a pipe-like target) must be given the zeros explicitly.
            const bool sparse = S_ISREG(st.st_mode);
            auto fail_output = [&](const std::string& why) {
                ::close(fd);
                return report(*output, why, kExitOutputError);
            };
            // An existing file is emptied first (its old blocks must not show through the
            // holes). A new one is not: on ext4 truncating even an empty file arms the
            // "replace via truncate" heuristic (auto_da_alloc), and close() then starts
            // writeback of every byte written (+0.3 s per GiB here).
            if (sparse && ((st.st_size != 0 && ::ftruncate(fd, 0) != 0) ||
                           ::ftruncate(fd, static_cast<off_t>(image->size())) != 0)) {
                return fail_output(std::strerror(errno));
            }
            std::vector<std::byte> buffer;
            Progress meter(*progress, image->size());
            bool write_failed = false;
            const std::uint64_t block = sparse ? *zero_block : 0;
            // Without zero detection data runs are copied inside the kernel, which needs
            // their file positions (mapping mode); with it, data comes from the mapping made
            // present ahead by the workers (--io=mmap) or is read ahead into small buffers
            // (--io=read); --io=auto picks the cheaper on this machine.
            const VisitOptions visit =
                block == 0 ? VisitOptions{worker_threads(), DataAccess::mapping, Prefetch::none}
                           : VisitOptions{worker_threads(), *io, Prefetch::touch};
            auto result = image->visit(
                0, UINT64_MAX,
                [&](const Run& run) -> Result<void> {
                    const std::uint64_t offset = run.offset;
                    const std::uint64_t length = run.length;
                    if (!run.bytes.empty()) {
                        auto ok =
                            write_run(run.file, fd, offset, run.bytes, block, buffer, write_failed);
                        if (!ok)
                            return ok;
                    } else if (!sparse) {
                        bool ok = true;
                        for (std::uint64_t done = 0; ok && done < length;) {
                            std::uint64_t n =
                                std::min<std::uint64_t>(length - done, sizeof kZeroChunk);
                            ok = pwrite_all(fd, kZeroChunk, n, offset + done);
                            done += n;
                        }
                        if (!ok) {
                            write_failed = true;
                            return Error{ErrorCode::io_error, std::strerror(errno)};
                        }
                    }
                    meter.update(offset + length);
                    return {};
                },
                visit);
            if (!result) {
                ::close(fd);
                return write_failed ? report(*output, result.error().message, kExitOutputError)
                                    : report(args->path, result.error().message, kExitImageError);
            }
            if (::close(fd) != 0) {
                return report(*output, std::strerror(errno), kExitOutputError);
            }
            meter.finish();
            return static_cast<int>(kExitOk);
        }};
}

} // namespace qcowmap::cli
