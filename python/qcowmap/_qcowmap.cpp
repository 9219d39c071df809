// qcowmap's Python binding (pybind11): an Image over the C++ library whose data extents are
// read-only memoryviews straight into the mapping. The pure-Python half (RawDisk, the package's
// names) is qcowmap/__init__.py; the typed interface is __init__.pyi.
//
// Lifetime: every object handed to Python that points into a mapping (a memoryview's owner, an
// Extent, an iterator) holds its own copy of the qcowmap::Image, i.e. a reference to the shared
// image state, so the mapping lives as long as the last of them, whatever happens to the
// Python Image (close, del). Long operations copy the Image under the GIL, then release it.
#include <qcowmap/bitmap.hpp>
#include <qcowmap/describe.hpp>
#include <qcowmap/hash.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/map.hpp>
#include <qcowmap/stream_import.hpp>
#include <qcowmap/writable.hpp>
#include <qcowmap/writer.hpp>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using qcowmap::Extent;
using qcowmap::ExtentKind;
using qcowmap::Image;

// ---------------------------------------------------------------------------------------------
// Errors: qcowmap.Error(OSError) with .code (the library's error code name), .message, .origin
// (which file), .path (that file), .refusal and .errno (qcowmap::to_errno).

PyObject* g_error_type = nullptr;

/// A library error on its way to Python: thrown in C++ (also from code that runs without the
/// GIL, whose guard reacquires it while unwinding), turned into qcowmap.Error by the translator.
struct LibraryError {
    qcowmap::Error error;
    std::string filename; ///< the image the error is about; empty when none
};

[[noreturn]] void raise(const qcowmap::Error& error, const std::string& filename) {
    throw LibraryError{error, filename};
}

py::str text(std::string_view s);

void translate(std::exception_ptr pointer) {
    try {
        if (pointer)
            std::rethrow_exception(pointer);
    } catch (const LibraryError& e) {
        // Like the CLI's one-line errors: "FILE: what is wrong", the file named once (the
        // library names it itself where it could not open it).
        const qcowmap::Error& error = e.error;
        std::string line =
            e.filename.empty() || (error.message_names_path && error.path == e.filename)
                ? error.message
                : e.filename + ": " + error.message;
        py::object type = py::reinterpret_borrow<py::object>(g_error_type);
        // Messages may quote names from the image that are not UTF-8: see text().
        py::object instance = type(text(line));
        instance.attr("code") = py::str(std::string(qcowmap::to_string(error.code)));
        instance.attr("message") = text(error.message);
        instance.attr("origin") = py::str(std::string(qcowmap::to_string(error.origin)));
        instance.attr("path") = error.path.empty() ? py::object(py::none()) : text(error.path);
        instance.attr("refusal") = error.refusal == qcowmap::Refusal::none
                                       ? py::object(py::none())
                                       : py::str(std::string(qcowmap::to_string(error.refusal)));
        instance.attr("errno") = qcowmap::to_errno(error);
        PyErr_SetObject(g_error_type, instance.ptr());
    }
}

// ---------------------------------------------------------------------------------------------
// Small conversions.

/// Text from an image (names, reasons): UTF-8, undecodable bytes kept as surrogates (as
/// os.fsdecode does) instead of failing.
py::str text(std::string_view s) {
    PyObject* object =
        PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape");
    if (!object)
        throw py::error_already_set();
    return py::reinterpret_steal<py::str>(object);
}

/// A path argument: str, bytes or os.PathLike, as the os module takes them (os.fspath, then
/// os.fsencode: TypeError for anything else). A NUL byte would cut the name short where the
/// kernel reads it: ValueError, as Python's own open() says it.
std::string fs_path(const py::object& path, const char* what) {
    py::object os = py::module_::import("os");
    std::string bytes = os.attr("fsencode")(os.attr("fspath")(path)).cast<std::string>();
    if (bytes.find('\0') != std::string::npos)
        throw py::value_error(fmt::format("{}: embedded null byte", what));
    return bytes;
}

std::uint64_t non_negative(long long value, const char* what) {
    if (value < 0)
        throw py::value_error(fmt::format("{} must not be negative ({})", what, value));
    return static_cast<std::uint64_t>(value);
}

// ---------------------------------------------------------------------------------------------
// Signals: long calls run without the GIL, and Python handles a signal (Ctrl-C's
// KeyboardInterrupt) only once the call returns. So they look in now and then.

/// Thrown (without the GIL) out of the library's callback when a signal handler raised: the
/// binding's call unwinds, retakes the GIL, and lets Python's exception (already set) through.
struct Interrupted {};

/// Checks for signals at most every kInterval of work, from code running without the GIL:
/// takes the GIL, runs Python's signal handlers (PyErr_CheckSignals) and the caller's progress
/// callback, and throws Interrupted when either raised. Only the main thread runs handlers;
/// elsewhere this costs a clock read per call.
class SignalCheck {
  public:
    static constexpr auto kInterval = std::chrono::milliseconds(50);

    explicit SignalCheck(py::object progress = py::none()) : progress_(std::move(progress)) {}

    /// Called with the GIL released.
    void operator()(std::uint64_t done = 0, std::uint64_t total = 0) {
        const auto now = std::chrono::steady_clock::now();
        if (now - last_ < kInterval)
            return;
        last_ = now;
        report(done, total);
    }

    /// Called with the GIL released, at the end (the progress callback sees done == total).
    void finish(std::uint64_t total) { report(total, total); }

  private:
    void report(std::uint64_t done, std::uint64_t total) {
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0)
            throw Interrupted{};
        if (!progress_.is_none()) {
            PyObject* result =
                PyObject_CallFunction(progress_.ptr(), "KK", static_cast<unsigned long long>(done),
                                      static_cast<unsigned long long>(total));
            if (!result)
                throw Interrupted{}; // the callback raised (KeyboardInterrupt included)
            Py_DECREF(result);
        }
    }

    py::object progress_;
    std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

/// Runs `body` (GIL released inside it) and turns Interrupted back into the Python exception
/// that caused it, once the GIL is held again.
template <typename Body> auto interruptible(Body&& body) -> decltype(body()) {
    try {
        return body();
    } catch (const Interrupted&) {
        throw py::error_already_set();
    }
}

// ---------------------------------------------------------------------------------------------
// Zero-copy bytes: a buffer exporter over a span of the mapping that owns a copy of the Image.

struct MappedBytes {
    Image image; // keeps the mapping alive for as long as any memoryview of it exists
    const std::byte* data = nullptr;
    std::size_t size = 0;
};

py::memoryview mapped_view(const Image& image, std::span<const std::byte> bytes) {
    py::object owner = py::cast(MappedBytes{image, bytes.data(), bytes.size()});
    return py::memoryview(py::reinterpret_borrow<py::buffer>(owner));
}

/// Bytes a read-ahead walk produced into a buffer of its own (read with pread), kept for as
/// long as any memoryview of them exists (the walk reads on into fresh buffers meanwhile).
struct HeldBytes {
    std::shared_ptr<const void> owner;
    const std::byte* data = nullptr;
    std::size_t size = 0;
};

py::memoryview held_view(std::shared_ptr<const void> owner, std::span<const std::byte> bytes) {
    py::object held = py::cast(HeldBytes{std::move(owner), bytes.data(), bytes.size()});
    return py::memoryview(py::reinterpret_borrow<py::buffer>(held));
}

/// One Decompressor per thread (it holds a cluster buffer and decoder state).
qcowmap::Decompressor& thread_decompressor() {
    thread_local qcowmap::Decompressor decompressor;
    return decompressor;
}

// ---------------------------------------------------------------------------------------------
// Extents.

/// One extent of the virtual disk as Python sees it. `data` is made on first use: a memoryview
/// into the mapping (data), None (zero), or the decompressed bytes of the range (compressed).
struct PyExtent {
    Image image;
    Extent extent;
    std::string filename;
    py::object data_cache;
    /// Shared with the iterator that made the extent when it reads ahead once data is wanted.
    std::shared_ptr<bool> data_wanted;

    py::object data() {
        if (data_cache)
            return data_cache;
        if (data_wanted && extent.kind != ExtentKind::zero)
            *data_wanted = true;
        switch (extent.kind) {
        case ExtentKind::data: {
            // Python code touching the view runs outside the library's fault boundary, where a
            // page that cannot be read would kill the interpreter: read every page once now,
            // inside it, so that a file cut short or an I/O error is a qcowmap.Error here.
            std::optional<py::gil_scoped_release> unlocked;
            if (extent.bytes.size() > 64 * 1024)
                unlocked.emplace();
            if (auto readable = image.check_readable(extent.bytes); !readable)
                raise(readable.error(), filename);
            unlocked.reset();
            data_cache = mapped_view(image, extent.bytes);
            break;
        }
        case ExtentKind::zero:
            data_cache = py::none();
            break;
        case ExtentKind::compressed: {
            PyObject* raw =
                PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(extent.length));
            if (!raw)
                throw py::error_already_set();
            py::object bytes = py::reinterpret_steal<py::object>(raw);
            {
                py::gil_scoped_release unlocked;
                auto span = thread_decompressor().decompress(image, extent);
                if (!span)
                    raise(span.error(), filename);
                std::copy(span->begin(), span->end(),
                          reinterpret_cast<std::byte*>(PyBytes_AS_STRING(raw)));
            }
            data_cache = bytes;
            break;
        }
        }
        return data_cache;
    }
};

/// The one place that drives the library's extent walks (Image::extents and a bitmap's dirty
/// extents, both single-pass input ranges) one extent at a time.
class Walk {
  public:
    virtual ~Walk() = default;
    /// The next extent, or false at the end or on error.
    virtual bool next(Extent& out) = 0;
    /// The error that stopped the walk, or nullptr.
    virtual const qcowmap::Error* error() const = 0;
};

template <typename Range> class RangeWalk final : public Walk {
  public:
    explicit RangeWalk(Range range) : range_(std::move(range)) {}
    bool next(Extent& out) override { return range_.next(out); }
    const qcowmap::Error* error() const override {
        return range_.error() ? &*range_.error() : nullptr;
    }

  private:
    Range range_; // stepped by hand (WalkRange::next)
};

/// The CLI's --io names: auto, mmap, read.
qcowmap::DataAccess data_access_named(const std::string& io) {
    if (io == "auto")
        return qcowmap::DataAccess::automatic;
    if (io == "mmap")
        return qcowmap::DataAccess::mapping;
    if (io == "read")
        return qcowmap::DataAccess::read;
    throw py::value_error("io must be 'auto', 'mmap' or 'read'");
}

/// The options of the walks that read ahead of a Python loop: `io` resolved (the measured
/// choice for "auto", so that the pieces' size is known), the next pieces' pages read once on
/// the workers (Prefetch::touch), `threads` workers (0: one per core, at least one).
qcowmap::VisitOptions read_ahead_options(const std::string& io, unsigned threads) {
    qcowmap::VisitOptions options;
    options.data_access = data_access_named(io);
    if (options.data_access == qcowmap::DataAccess::automatic)
        options.data_access = qcowmap::automatic_data_access();
    options.prefetch = qcowmap::Prefetch::touch;
    options.threads = threads != 0 ? threads : std::max(2u, std::thread::hardware_concurrency());
    return options;
}

/// The writable contiguous buffer of `buffer`, as io.FileIO.readinto takes it.
std::unique_ptr<Py_buffer, void (*)(Py_buffer*)> writable_buffer(const py::object& buffer,
                                                                 Py_buffer& view) {
    if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
        // As io.FileIO.readinto says it.
        PyErr_Clear();
        throw py::type_error(
            fmt::format("readinto() argument must be read-write bytes-like object, not {}",
                        Py_TYPE(buffer.ptr())->tp_name));
    }
    return {&view, PyBuffer_Release};
}

/// `read(offset, length)` of Image and RawDisk: a bytes object of the `length` bytes at `offset`
/// (fewer at the end of a disk of `size` bytes) that `read(dest, offset)` fills. Beyond the end:
/// the library's out_of_range error, from an empty read.
template <typename Read>
py::bytes read_bytes(std::uint64_t size, long long offset_arg, long long length_arg, Read&& read) {
    const std::uint64_t offset = non_negative(offset_arg, "offset");
    const std::uint64_t length = non_negative(length_arg, "length");
    const std::uint64_t n = offset <= size ? std::min(length, size - offset) : 0;
    PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
    if (!raw)
        throw py::error_already_set();
    py::bytes bytes = py::reinterpret_steal<py::bytes>(raw);
    read(std::span<std::byte>(reinterpret_cast<std::byte*>(PyBytes_AS_STRING(raw)), n), offset);
    return bytes;
}

/// Reads into `dest` (fewer bytes only at the end of the disk). Small reads keep the GIL:
/// dropping and retaking it costs more than they do.
std::size_t read_span(const Image& image, std::span<std::byte> dest, std::uint64_t offset,
                      const std::string& filename) {
    constexpr std::size_t kReleaseGilAbove = 16 * 1024;
    if (dest.size() <= kReleaseGilAbove) {
        auto n = image.read(dest, offset);
        if (!n)
            raise(n.error(), filename);
        return *n;
    }
    // Long reads in slices, looking for signals in between (a 3 GiB read took 26 s on a
    // shadow-paging VM): 8 MiB is a few ms from the page cache, ~70 ms from a slow disk.
    constexpr std::size_t kSlice = 8u << 20;
    return interruptible([&] {
        py::gil_scoped_release unlocked;
        SignalCheck check;
        std::size_t total = 0;
        do {
            auto piece = dest.subspan(total, std::min(kSlice, dest.size() - total));
            auto n = image.read(piece, offset + total);
            if (!n)
                raise(n.error(), filename);
            total += *n;
            if (*n < piece.size())
                break; // the end of the disk
            check();
        } while (total < dest.size());
        return total;
    });
}

/// The reads of a RawDisk (Image.open_raw()). A read that starts where the one before ended
/// continues a read-ahead walk (Image::runs: the next pieces read on the workers while Python
/// works on this one), so hashlib.file_digest and shutil.copyfileobj stream; a read anywhere
/// else is one Image::read, as random access (tarfile's seeks, a partition table) wants, and
/// starts no threads.
class SequentialReader {
  public:
    SequentialReader(Image image, std::string filename, qcowmap::VisitOptions options)
        : image_(std::move(image)), filename_(std::move(filename)), options_(options) {}

    std::size_t readinto(long long offset_arg, const py::object& buffer) {
        const std::uint64_t offset = non_negative(offset_arg, "offset");
        Py_buffer view;
        auto release = writable_buffer(buffer, view);
        return read_into(std::span<std::byte>(static_cast<std::byte*>(view.buf),
                                              static_cast<std::size_t>(view.len)),
                         offset);
    }

    py::bytes read(long long offset_arg, long long length_arg) {
        return read_bytes(
            image_.size(), offset_arg, length_arg,
            [&](std::span<std::byte> dest, std::uint64_t offset) { read_into(dest, offset); });
    }

  private:
    std::size_t read_into(std::span<std::byte> dest, std::uint64_t offset) {
        const std::uint64_t size = image_.size();
        if (offset >= size || dest.empty())
            return 0;
        dest = dest.first(
            static_cast<std::size_t>(std::min<std::uint64_t>(dest.size(), size - offset)));
        // Another Python thread reading the same RawDisk (the GIL is released below) gets
        // plain reads: the walk is one thread's.
        if (busy_)
            return read_span(image_, dest, offset, filename_);
        busy_ = true;
        struct Idle {
            bool& busy;
            ~Idle() { busy = false; }
        } idle{busy_};
        // A read that follows the last one, or a long one, streams; a short read elsewhere is
        // random access and starts no threads.
        const bool streams = offset == last_end_ || dest.size() > kRandomReadBytes;
        last_end_ = offset + dest.size();
        if (!streams) {
            walk_.reset();
            return read_span(image_, dest, offset, filename_);
        }
        return interruptible([&] {
            py::gil_scoped_release unlocked;
            SignalCheck check;
            if (!walk_ || position_ != offset) {
                walk_ = std::make_unique<qcowmap::detail::RunWalk>(image_, offset, size, options_);
                have_run_ = false;
                position_ = offset;
            }
            std::size_t done = 0;
            while (done < dest.size()) {
                if (!have_run_ || position_ == run_.offset + run_.length) {
                    have_run_ = walk_->next(run_);
                    if (!have_run_) {
                        qcowmap::Error error = walk_->error()
                                                   ? *walk_->error()
                                                   : qcowmap::Error{qcowmap::ErrorCode::io_error,
                                                                    "the walk ended early"};
                        walk_.reset();
                        last_end_ = UINT64_MAX;
                        raise(error, filename_);
                    }
                }
                const std::uint64_t into = position_ - run_.offset;
                const std::size_t n = static_cast<std::size_t>(
                    std::min<std::uint64_t>(run_.length - into, dest.size() - done));
                if (run_.bytes.empty())
                    std::memset(dest.data() + done, 0, n);
                else
                    std::memcpy(dest.data() + done, run_.bytes.data() + into, n);
                done += n;
                position_ += n;
                check();
            }
            return done;
        });
    }

    static constexpr std::size_t kRandomReadBytes = 1u << 20;
    Image image_;
    std::string filename_;
    qcowmap::VisitOptions options_;
    bool busy_ = false;
    std::unique_ptr<qcowmap::detail::RunWalk> walk_;
    qcowmap::Run run_; // the run being read; its bytes live until the walk's next step
    bool have_run_ = false;
    std::uint64_t position_ = 0;          // the next byte of the disk the walk gives
    std::uint64_t last_end_ = UINT64_MAX; // where the last read ended
};

/// How an extent iterator reads data ahead of the loop (Image.extents(prefetch=True)).
struct ReadAhead {
    qcowmap::VisitOptions options; // threads, the resolved data access, Prefetch::touch
    std::uint64_t end = 0;
    /// Data runs are handed out in pieces of at most this many bytes (the pieces the read-ahead
    /// walk cuts): the next pieces are produced while the loop consumes one.
    std::uint64_t piece = 0;
};

/// Python iterator over extents. The walk runs in C++ without the GIL, a batch at a time.
///
/// With read-ahead, it starts as a walk of the map (data runs cut into pieces) and turns into a
/// read-ahead walk (Image::runs) at the first extent whose data the loop reads: a loop that
/// only looks at offsets and kinds never reads the disk, and one that hashes or copies finds
/// the next pieces already read (or their mapped pages present) when it gets to them.
class ExtentIterator {
  public:
    ExtentIterator(Image image, std::unique_ptr<Walk> walk, std::string filename,
                   std::optional<ReadAhead> ahead = std::nullopt)
        : image_(std::move(image)), walk_(std::move(walk)), filename_(std::move(filename)),
          ahead_(std::move(ahead)) {
        if (ahead_)
            data_wanted_ = std::make_shared<bool>(false);
    }

    PyExtent next() {
        if (busy_)
            throw py::value_error("extent iterator already executing in another thread");
        // Another Python thread may call next() while this one runs without the GIL.
        busy_ = true;
        struct Idle {
            bool& busy;
            ~Idle() { busy = false; }
        } idle{busy_};
        // The map walk may have reached the end in a batch the loop has not finished yet.
        if (data_wanted_ && *data_wanted_ && !runs_ && (index_ < batch_.size() || !done_))
            start_reading_ahead();
        if (runs_)
            return next_run();
        if (index_ == batch_.size() && !done_) {
            batch_.clear();
            index_ = 0;
            py::gil_scoped_release unlocked;
            while (batch_.size() < kBatch) {
                if (!cutting_) {
                    if (!walk_->next(cut_)) {
                        done_ = true;
                        break;
                    }
                    if (!ahead_ || cut_.kind != ExtentKind::data) {
                        batch_.push_back(cut_);
                        continue;
                    }
                    cut_done_ = 0;
                    cutting_ = true;
                }
                batch_.push_back(next_piece());
            }
        }
        if (index_ < batch_.size()) {
            const Extent& e = batch_[index_++];
            next_offset_ = e.offset + e.length;
            return PyExtent{image_, e, filename_, py::object(), data_wanted_};
        }
        raise_once();
        throw py::stop_iteration();
    }

  private:
    /// The next piece of the data run `cut_`, cut as the read-ahead walk cuts it (from its
    /// start, `piece` bytes at a time) so that the two walks agree wherever one takes over from
    /// the other. One piece at a time: a run of a TiB is a million pieces, never all in memory.
    Extent next_piece() {
        Extent piece = cut_;
        piece.offset = cut_.offset + cut_done_;
        piece.length = std::min(ahead_->piece, cut_.length - cut_done_);
        piece.bytes = cut_.bytes.subspan(cut_done_, piece.length);
        if (piece.host_offset)
            *piece.host_offset += cut_done_;
        if (piece.file)
            piece.file->offset += cut_done_;
        cut_done_ += piece.length;
        cutting_ = cut_done_ < cut_.length;
        return piece;
    }

    void start_reading_ahead() {
        const std::uint64_t from = index_ < batch_.size() ? batch_[index_].offset : next_offset_;
        batch_.clear();
        index_ = 0;
        done_ = false;
        cutting_ = false;
        py::gil_scoped_release unlocked;
        runs_ =
            std::make_unique<qcowmap::detail::RunWalk>(image_, from, ahead_->end, ahead_->options);
    }

    PyExtent next_run() {
        qcowmap::Run run;
        std::shared_ptr<const void> owner;
        Extent extent;
        bool produced = false;
        {
            py::gil_scoped_release unlocked;
            produced = runs_->next(run);
            if (produced) {
                owner = runs_->hold();
                extent = runs_->extent();
            }
        }
        if (!produced) {
            done_ = true;
            if (runs_->error() && !raised_) {
                raised_ = true;
                raise(*runs_->error(), filename_);
            }
            throw py::stop_iteration();
        }
        // The piece of `extent` the run is, as an Extent whose data is the run's bytes.
        const std::uint64_t into = run.offset - extent.offset;
        Extent piece = extent;
        piece.offset = run.offset;
        piece.length = run.length;
        if (piece.host_offset && extent.kind == ExtentKind::data)
            *piece.host_offset += into;
        py::object data = py::none();
        if (run.kind == ExtentKind::data) {
            piece.bytes = run.bytes;
            piece.file = run.file;
            // Mapped bytes were made present and read inside the library's fault boundary
            // (Prefetch::touch); bytes read with pread are the walk's buffer, kept by the view.
            data = owner ? py::object(held_view(std::move(owner), run.bytes))
                         : py::object(mapped_view(image_, run.bytes));
        } else if (run.kind == ExtentKind::compressed) {
            data = py::bytes(reinterpret_cast<const char*>(run.bytes.data()), run.bytes.size());
        }
        next_offset_ = run.offset + run.length;
        return PyExtent{image_, piece, filename_, data, nullptr};
    }

    void raise_once() {
        if (const qcowmap::Error* error = walk_->error(); error && !raised_) {
            raised_ = true; // a failed walk raises once, then ends like any exhausted iterator
            raise(*error, filename_);
        }
    }

    static constexpr std::size_t kBatch = 256;
    Image image_;
    std::unique_ptr<Walk> walk_;
    std::string filename_;
    std::optional<ReadAhead> ahead_;
    std::shared_ptr<bool> data_wanted_;
    std::unique_ptr<qcowmap::detail::RunWalk> runs_;
    std::vector<Extent> batch_;
    std::size_t index_ = 0;
    Extent cut_;                 // a data run being cut into pieces (with read-ahead)
    std::uint64_t cut_done_ = 0; // bytes of `cut_` already in batches
    bool cutting_ = false;
    std::uint64_t next_offset_ = 0;
    bool done_ = false;
    bool busy_ = false;
    bool raised_ = false;
};

/// A bitmap's flags by name, as `qcowmap bitmaps --output=json` lists them.
py::list bitmap_flags(const qcowmap::BitmapEntry& e) {
    py::list flags;
    for (const std::string& name : qcowmap::bitmap_flag_names(e.flags))
        flags.append(name);
    return flags;
}

// ---------------------------------------------------------------------------------------------
// The Image.

class PyImage {
  public:
    PyImage(Image image, std::string filename)
        : image_(std::move(image)), filename_(std::move(filename)) {}

    /// The image for one operation (a cheap copy that keeps the mapping alive during it).
    Image get() const {
        if (!image_)
            throw py::value_error("I/O operation on closed image");
        return *image_;
    }
    void close() { image_.reset(); }
    bool closed() const { return !image_; }
    const std::string& filename() const { return filename_; }

    std::uint64_t size() const { return get().size(); }

    /// `qcowmap info --output=json` of the top layer, parsed: the library's own JSON, so the
    /// two never differ.
    py::object info() const {
        std::string json = qcowmap::info_json(get());
        return py::module_::import("json").attr("loads")(text(json));
    }

    py::list layers() const {
        py::list out;
        for (const qcowmap::LayerInfo& layer : get().layers()) {
            py::dict d;
            d["filename"] = text(layer.path.string());
            d["format"] = layer.format;
            d["virtual-size"] = layer.virtual_size;
            out.append(d);
        }
        return out;
    }

    ExtentIterator extents(long long start, std::optional<long long> end, bool prefetch,
                           const std::string& io, unsigned threads) const {
        Image image = get();
        std::uint64_t from = non_negative(start, "start");
        std::uint64_t to = end ? non_negative(*end, "end") : UINT64_MAX;
        auto walk = std::make_unique<RangeWalk<qcowmap::ExtentRange>>(image.extents(from, to));
        std::optional<ReadAhead> ahead;
        if (prefetch) {
            ahead.emplace();
            ahead->end = to;
            ahead->options = read_ahead_options(io, threads);
            ahead->piece = ahead->options.data_access == qcowmap::DataAccess::read
                               ? qcowmap::kReadPieceBytes
                               : qcowmap::kPrefetchWindowBytes;
        } else if (io != "auto" && io != "mmap") {
            throw py::value_error("io must be 'auto', 'mmap' or 'read' (and 'read' reads ahead: "
                                  "prefetch=True)");
        }
        return ExtentIterator(image, std::move(walk), filename_, std::move(ahead));
    }

    ExtentIterator dirty_extents(const std::string& name, long long start,
                                 std::optional<long long> end) const {
        Image image = get();
        std::uint64_t from = non_negative(start, "start");
        std::uint64_t to = end ? non_negative(*end, "end") : UINT64_MAX;
        auto bitmap = qcowmap::DirtyBitmap::open(image, name);
        if (!bitmap)
            raise(bitmap.error(), filename_);
        auto walk =
            std::make_unique<RangeWalk<qcowmap::DirtyExtentRange>>(bitmap->dirty_extents(from, to));
        return ExtentIterator(image, std::move(walk), filename_);
    }

    SequentialReader sequential_reader(const std::string& io, unsigned threads) const {
        return SequentialReader(get(), filename_, read_ahead_options(io, threads));
    }

    py::bytes read(long long offset_arg, long long length_arg) const {
        Image image = get();
        return read_bytes(image.size(), offset_arg, length_arg,
                          [&](std::span<std::byte> dest, std::uint64_t offset) {
                              read_span(image, dest, offset, filename_);
                          });
    }

    std::size_t readinto(long long offset_arg, const py::object& buffer) const {
        Image image = get();
        const std::uint64_t offset = non_negative(offset_arg, "offset");
        Py_buffer view;
        auto release = writable_buffer(buffer, view);
        std::span<std::byte> dest(static_cast<std::byte*>(view.buf),
                                  static_cast<std::size_t>(view.len));
        return read_span(image, dest, offset, filename_);
    }

    py::list map(long long start, std::optional<long long> length) const {
        Image image = get();
        qcowmap::MapOptions options;
        options.start = non_negative(start, "start");
        if (length)
            options.length = non_negative(*length, "length");
        std::vector<qcowmap::MapEntry> entries;
        interruptible([&] {
            py::gil_scoped_release unlocked;
            SignalCheck check;
            auto ok = qcowmap::map_image(image, options,
                                         [&](const qcowmap::MapEntry& e) -> qcowmap::Result<void> {
                                             entries.push_back(e);
                                             check();
                                             return {};
                                         });
            if (!ok)
                raise(ok.error(), filename_);
        });
        // The keys and their order of `qemu-img map --output=json` (compressed: qemu 8.2+).
        py::list out;
        for (const qcowmap::MapEntry& e : entries) {
            py::dict d;
            d["start"] = e.start;
            d["length"] = e.length;
            d["depth"] = e.depth;
            d["present"] = e.present;
            d["zero"] = e.zero;
            d["data"] = e.data;
            d["compressed"] = e.compressed;
            if (e.offset)
                d["offset"] = *e.offset;
            out.append(d);
        }
        return out;
    }

    py::list bitmaps() const {
        Image image = get();
        std::vector<qcowmap::BitmapSummary> summaries;
        {
            py::gil_scoped_release unlocked;
            summaries = qcowmap::list_bitmaps(image);
        }
        // The keys of `qcowmap bitmaps --output=json`.
        py::list out;
        for (const qcowmap::BitmapSummary& s : summaries) {
            py::dict d;
            d["name"] = text(s.entry.name);
            d["granularity"] = s.entry.granularity();
            d["flags"] = bitmap_flags(s.entry);
            d["enabled"] = s.entry.enabled();
            d["in-use"] = s.entry.in_use();
            d["consistent"] = s.entry.consistent();
            d["usable"] = !s.error.has_value();
            d["error"] = s.error ? py::object(text(s.error->message)) : py::object(py::none());
            d["dirty-bytes"] =
                s.dirty_bytes ? py::object(py::int_(*s.dirty_bytes)) : py::object(py::none());
            out.append(d);
        }
        return out;
    }

    py::object hash(const std::string& algo, std::optional<long long> block_size,
                    long long threads_arg, const py::object& progress) const {
        Image image = get();
        auto algorithm = qcowmap::parse_hash_algorithm(algo);
        if (!algorithm)
            throw py::value_error(
                fmt::format("unknown hash algorithm '{}' (sha256, sha512, blake2b512, xxh3-128, "
                            "blkhash-sha256, blkhash-sha512, blkhash-blake2b512)",
                            algo));
        const auto threads = static_cast<unsigned>(
            std::min<std::uint64_t>(non_negative(threads_arg, "threads"), 1024));
        if (!progress.is_none() && !PyCallable_Check(progress.ptr()))
            throw py::type_error("progress must be callable(done, total) or None");
        const std::uint64_t size = image.size();
        if (!block_size) {
            qcowmap::HashOptions options;
            options.algorithm = *algorithm;
            options.threads = threads;
            std::string hex;
            interruptible([&] {
                py::gil_scoped_release unlocked;
                SignalCheck check(progress);
                options.progress = [&](std::uint64_t done, std::uint64_t total) {
                    check(done, total);
                };
                auto digest = qcowmap::hash_image(image, options);
                if (!digest)
                    raise(digest.error(), filename_);
                check.finish(size);
                hex = digest->hex();
            });
            return py::str(hex);
        }
        const std::uint64_t bs = non_negative(*block_size, "block_size");
        if (bs < qcowmap::kMinHashBlockSize || (bs & (bs - 1)) != 0) {
            throw py::value_error(fmt::format("block_size {} is not a power of two of at least {}",
                                              bs, qcowmap::kMinHashBlockSize));
        }
        qcowmap::BlockHashOptions options;
        options.algorithm = *algorithm;
        options.block_size = bs;
        options.threads = threads;
        std::vector<qcowmap::BlockDigest> blocks;
        interruptible([&] {
            py::gil_scoped_release unlocked;
            SignalCheck check(progress);
            auto ok = qcowmap::hash_blocks(
                image, options, [&](const qcowmap::BlockDigest& b) -> qcowmap::Result<void> {
                    blocks.push_back(b);
                    check(b.offset + b.length, size);
                    return {};
                });
            if (!ok)
                raise(ok.error(), filename_);
            check.finish(size);
        });
        // The entries of `qcowmap hash --block-size=N --output=json`'s "blocks".
        py::list out;
        for (const qcowmap::BlockDigest& b : blocks) {
            py::dict d;
            d["index"] = b.index;
            d["offset"] = b.offset;
            d["length"] = b.length;
            d["digest"] = b.digest.hex();
            d["zero"] = b.zero;
            out.append(d);
        }
        return out;
    }

  private:
    std::optional<Image> image_;
    std::string filename_;
};

PyImage open_image(const py::object& path, const py::object& snapshot, bool backing,
                   const py::object& data_file, bool untrusted, bool force_share) {
    std::string filename = fs_path(path, "path");
    qcowmap::OpenOptions options;
    options.backing = backing ? qcowmap::BackingMode::follow : qcowmap::BackingMode::none;
    // A snapshot is named by its ID or its name; an int is taken as the ID.
    if (py::isinstance<py::int_>(snapshot) && !py::isinstance<py::bool_>(snapshot))
        options.snapshot = py::str(snapshot).cast<std::string>();
    else if (py::isinstance<py::str>(snapshot))
        options.snapshot = snapshot.cast<std::string>();
    else if (!snapshot.is_none())
        throw py::type_error("snapshot must be a str (ID or name), an int (ID) or None");
    if (!data_file.is_none())
        options.data_file = fs_path(data_file, "data_file");
    options.untrusted = untrusted;
    options.force_share = force_share;
    std::optional<qcowmap::Result<Image>> image;
    {
        py::gil_scoped_release unlocked;
        image.emplace(Image::open(filename, options));
    }
    if (!*image)
        raise(image->error(), filename);
    return PyImage(std::move(**image), filename);
}

/// qcowmap.stream_convert: a qcow2 image read once from a Python binary file object (a pipe,
/// an HTTP response) into a raw file, by the library's stream decoder. The decoder runs without
/// the GIL and takes it back only to call the file object's readinto (or read).
py::dict stream_convert(const py::object& fileobj, const py::object& target, bool replace,
                        const py::object& max_spool, const py::object& expect_checksum,
                        bool backing, const py::object& data_file, unsigned threads) {
    const std::string filename = fs_path(target, "target");
    qcowmap::StreamOptions options;
    options.threads = threads;
    options.backing = backing ? qcowmap::BackingMode::follow : qcowmap::BackingMode::none;
    if (!max_spool.is_none())
        options.max_spool = max_spool.cast<std::uint64_t>();
    if (!data_file.is_none())
        options.data_file = fs_path(data_file, "data_file");
    if (!expect_checksum.is_none()) {
        auto expected = qcowmap::parse_expected_digest(expect_checksum.cast<std::string>());
        if (!expected)
            throw py::value_error("expect_checksum: " + expected.error().message);
        options.expect_digest = *expected;
    }
    py::object readinto = py::getattr(fileobj, "readinto", py::none());
    py::object read = py::getattr(fileobj, "read", py::none());
    if (readinto.is_none() && read.is_none())
        throw py::type_error("stream_convert needs a binary file object (readinto or read)");
    std::optional<py::error_already_set> python_error;
    qcowmap::StreamReader reader =
        [&](std::span<std::byte> buffer) -> qcowmap::Result<std::size_t> {
        py::gil_scoped_acquire locked;
        const std::size_t want = std::min<std::size_t>(buffer.size(), 1u << 20);
        try {
            if (!readinto.is_none()) {
                py::object n = readinto(py::memoryview::from_memory(
                    buffer.data(), static_cast<py::ssize_t>(want), false));
                if (n.is_none())
                    throw py::value_error("the file object is non-blocking (readinto gave None)");
                return std::min(n.cast<std::size_t>(), want);
            }
            py::bytes chunk = read(want);
            const std::string_view bytes = chunk;
            const std::size_t n = std::min(bytes.size(), want);
            std::memcpy(buffer.data(), bytes.data(), n);
            return n;
        } catch (py::error_already_set& e) {
            python_error.emplace(std::move(e));
            return qcowmap::Error{qcowmap::ErrorCode::io_error, "reading the stream failed"};
        }
    };
    std::optional<qcowmap::Result<qcowmap::StreamStats>> stats;
    {
        py::gil_scoped_release unlocked;
        stats.emplace(qcowmap::stream_to_raw_file(reader, filename, replace, options));
    }
    if (python_error)
        throw std::move(*python_error);
    if (!*stats) {
        const qcowmap::Error& error = (*stats).error();
        raise(error, qcowmap::is_target_error(error) ? filename : std::string("<stream>"));
    }
    const qcowmap::StreamStats& st = **stats;
    py::dict out;
    out["stream_bytes"] = st.stream_bytes;
    out["disk_size"] = st.disk_size;
    out["data_bytes"] = st.data_bytes;
    out["compressed_clusters"] = st.compressed_clusters;
    out["l2_tables"] = st.l2_tables;
    out["spooled_bytes"] = st.spooled_bytes;
    out["spool_peak"] = st.spool_peak;
    out["spool_used_bytes"] = st.spool_used_bytes;
    out["skipped_tail_bytes"] = st.skipped_tail_bytes;
    if (st.input_digest)
        out["input_digest"] = st.input_digest->hex();
    return out;
}

// ---------------------------------------------------------------------------------------------
// Writing in place (issue 27): qcowmap.open(path, writable=True) and qcowmap.create.

/// A contiguous read-only view of any object with the buffer protocol (bytes, bytearray,
/// memoryview, array, numpy arrays...), released on destruction.
class ContiguousBuffer {
  public:
    explicit ContiguousBuffer(const py::object& object) {
        if (PyObject_GetBuffer(object.ptr(), &view_, PyBUF_SIMPLE) != 0)
            throw py::error_already_set();
    }
    ~ContiguousBuffer() { PyBuffer_Release(&view_); }
    ContiguousBuffer(const ContiguousBuffer&) = delete;
    ContiguousBuffer& operator=(const ContiguousBuffer&) = delete;
    std::span<const std::byte> bytes() const {
        return {static_cast<const std::byte*>(view_.buf), static_cast<std::size_t>(view_.len)};
    }

  private:
    Py_buffer view_{};
};

/// A qcow2 image opened for writing. Calls are serialised by the library; the GIL is released
/// during large ones so other Python threads run.
class PyWritable {
    // Defined first: its deduced return type is needed by the methods below.
    /// Runs `operation` (without the GIL when it moves more than 16 KiB) and raises its error.
    template <typename Operation> auto call(Operation operation, std::size_t bytes) const {
        constexpr std::size_t kReleaseGilAbove = 16 * 1024;
        std::optional<py::gil_scoped_release> unlocked;
        if (bytes > kReleaseGilAbove)
            unlocked.emplace();
        auto result = operation();
        if (!result) {
            unlocked.reset();
            raise(result.error(), filename_);
        }
        if constexpr (std::is_same_v<decltype(result), qcowmap::Result<void>>)
            return;
        else
            return *result;
    }

  public:
    PyWritable(qcowmap::WritableImage image, std::string filename)
        : image_(std::make_shared<qcowmap::WritableImage>(std::move(image))),
          filename_(std::move(filename)) {}

    const std::string& filename() const { return filename_; }
    bool closed() const { return closed_; }

    qcowmap::WritableImage& get() const {
        if (closed_)
            throw py::value_error("I/O operation on closed image");
        return *image_;
    }

    std::uint64_t size() const { return get().size(); }

    py::bytes read(long long offset_arg, long long length_arg) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t offset = non_negative(offset_arg, "offset");
        std::uint64_t length = non_negative(length_arg, "length");
        const std::uint64_t size = image.size();
        length = offset >= size ? 0 : std::min(length, size - offset);
        PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(length));
        if (!raw)
            throw py::error_already_set();
        py::bytes out = py::reinterpret_steal<py::bytes>(raw);
        std::span<std::byte> dest(reinterpret_cast<std::byte*>(PyBytes_AsString(raw)), length);
        call([&] { return image.read(dest, offset); }, length);
        return out;
    }

    std::size_t readinto(long long offset_arg, const py::object& buffer) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t offset = non_negative(offset_arg, "offset");
        Py_buffer view{};
        if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_SIMPLE | PyBUF_WRITABLE) != 0)
            throw py::error_already_set();
        std::unique_ptr<Py_buffer, void (*)(Py_buffer*)> release(&view, PyBuffer_Release);
        std::span<std::byte> dest(static_cast<std::byte*>(view.buf),
                                  static_cast<std::size_t>(view.len));
        return call([&] { return image.read(dest, offset); }, dest.size());
    }

    std::size_t write(long long offset_arg, const py::object& data) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t offset = non_negative(offset_arg, "offset");
        ContiguousBuffer buffer(data);
        const auto bytes = buffer.bytes();
        call([&] { return image.write(offset, bytes); }, bytes.size());
        return bytes.size();
    }

    void write_zeroes(long long offset, long long length, bool unmap) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t from = non_negative(offset, "offset");
        const std::uint64_t n = non_negative(length, "length");
        call([&] { return image.write_zeroes(from, n, unmap); }, n);
    }

    void discard(long long offset, long long length) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t from = non_negative(offset, "offset");
        const std::uint64_t n = non_negative(length, "length");
        call([&] { return image.discard(from, n); }, n);
    }

    void flush() const {
        qcowmap::WritableImage& image = get();
        call([&] { return image.flush(); }, SIZE_MAX);
    }

    void resize(long long size) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t n = non_negative(size, "size");
        call([&] { return image.resize(n); }, SIZE_MAX);
    }

    py::dict block_status(long long offset, long long length) const {
        qcowmap::WritableImage& image = get();
        const std::uint64_t from = non_negative(offset, "offset");
        const std::uint64_t n = non_negative(length, "length");
        auto status = image.block_status(from, n);
        if (!status)
            raise(status.error(), filename_);
        py::dict d;
        d["offset"] = status->offset;
        d["length"] = status->length;
        d["allocated"] = status->allocated;
        d["zero"] = status->zero;
        return d;
    }

    PyImage snapshot() const {
        qcowmap::WritableImage& image = get();
        std::optional<qcowmap::Result<Image>> view;
        {
            py::gil_scoped_release unlocked;
            view.emplace(image.snapshot_view());
        }
        if (!*view)
            raise(view->error(), filename_);
        return PyImage(std::move(**view), filename_);
    }

    void close() {
        if (closed_)
            return;
        closed_ = true;
        qcowmap::Result<void> ok;
        {
            py::gil_scoped_release unlocked;
            ok = image_->close();
        }
        if (!ok)
            raise(ok.error(), filename_);
    }

  private:
    std::shared_ptr<qcowmap::WritableImage> image_;
    std::string filename_;
    bool closed_ = false;
};

PyWritable open_writable(const py::object& path, bool backing, const py::object& data_file,
                         bool untrusted, bool lock) {
    std::string filename = fs_path(path, "path");
    qcowmap::WritableOptions options;
    options.open.backing = backing ? qcowmap::BackingMode::follow : qcowmap::BackingMode::none;
    if (!data_file.is_none())
        options.open.data_file = fs_path(data_file, "data_file");
    options.open.untrusted = untrusted;
    options.lock = lock;
    std::optional<qcowmap::Result<qcowmap::WritableImage>> image;
    {
        py::gil_scoped_release unlocked;
        image.emplace(qcowmap::WritableImage::open(filename, options));
    }
    if (!*image)
        raise(image->error(), filename);
    return PyWritable(std::move(**image), filename);
}

void create_image(const py::object& path, long long size, const std::string& options_text) {
    std::string filename = fs_path(path, "path");
    qcowmap::CreateOptions options;
    if (auto ok = qcowmap::parse_create_options(options_text, options); !ok)
        raise(ok.error(), filename);
    const std::uint64_t bytes = non_negative(size, "size");
    qcowmap::Result<void> ok;
    {
        py::gil_scoped_release unlocked;
        ok = qcowmap::create(filename, bytes, options);
    }
    if (!ok)
        raise(ok.error(), filename);
}

} // namespace

PYBIND11_MODULE(_qcowmap, m) {
    m.doc() = "qcowmap's C++ core; use the qcowmap package.";
    m.attr("__version__") = std::string(qcowmap::version());

    g_error_type = PyErr_NewExceptionWithDoc(
        "qcowmap.Error",
        "An image could not be opened or read. .code is the library's error code name "
        "(\"not_qcow2\", \"io_error\", ...), .message the library's message, .origin the file "
        "it is about (\"image\", \"backing\", \"data_file\", \"target\" or \"none\"), .path "
        "that file (or None), .refusal the refusal's name (\"untrusted\", \"image_changed\", "
        "...) or None, .errno the errno the C API gives; str() is \"FILE: message\".",
        PyExc_OSError, nullptr);
    if (!g_error_type)
        throw py::error_already_set();
    m.attr("Error") = py::reinterpret_borrow<py::object>(g_error_type);
    py::register_exception_translator(translate);

    py::class_<MappedBytes>(m, "_MappedBytes", py::buffer_protocol())
        .def_buffer([](MappedBytes& b) {
            return py::buffer_info(const_cast<std::byte*>(b.data), 1, "B", 1,
                                   {static_cast<py::ssize_t>(b.size)}, {py::ssize_t{1}},
                                   /*readonly=*/true);
        });

    py::class_<SequentialReader>(m, "_SequentialReader")
        .def("readinto", &SequentialReader::readinto, py::arg("offset"), py::arg("buffer"))
        .def("read", &SequentialReader::read, py::arg("offset"), py::arg("length"));

    py::class_<HeldBytes>(m, "_HeldBytes", py::buffer_protocol()).def_buffer([](HeldBytes& b) {
        return py::buffer_info(const_cast<std::byte*>(b.data), 1, "B", 1,
                               {static_cast<py::ssize_t>(b.size)}, {py::ssize_t{1}},
                               /*readonly=*/true);
    });

    py::class_<PyExtent>(m, "Extent",
                         "A run [offset, offset + length) of the virtual disk whose bytes are all "
                         "obtained one way (kind \"data\", \"zero\" or \"compressed\").")
        .def_property_readonly(
            "offset", [](const PyExtent& e) { return e.extent.offset; },
            "Start in the virtual disk.")
        .def_property_readonly(
            "length", [](const PyExtent& e) { return e.extent.length; }, "Bytes covered (never 0).")
        .def_property_readonly(
            "kind", [](const PyExtent& e) { return qcowmap::to_string(e.extent.kind); },
            "\"data\", \"zero\" or \"compressed\".")
        .def_property_readonly(
            "present", [](const PyExtent& e) { return e.extent.present; },
            "False where no layer allocates the range (qemu-img map's \"present\").")
        .def_property_readonly(
            "depth", [](const PyExtent& e) { return e.extent.depth; },
            "The layer that supplied the range: 0 is the image itself.")
        .def_property_readonly(
            "host_offset",
            [](const PyExtent& e) -> std::optional<std::uint64_t> { return e.extent.host_offset; },
            "Where the run starts in its host file (the layer's file or its data file), or None.")
        .def_property_readonly("data", &PyExtent::data,
                               "data: a read-only memoryview straight into the mapping (no copy), "
                               "valid as long as it lives, even after the Image is closed; its "
                               "pages are read once when it is made (qcowmap.Error if the file "
                               "shrank or a page cannot be read; a page that fails later still "
                               "raises SIGBUS when touched); zero: None; compressed: the "
                               "decompressed bytes of the range.")
        .def("__repr__", [](const PyExtent& e) {
            return fmt::format("Extent(offset={}, length={}, kind='{}', present={}, depth={})",
                               e.extent.offset, e.extent.length, qcowmap::to_string(e.extent.kind),
                               e.extent.present ? "True" : "False", e.extent.depth);
        });

    py::class_<ExtentIterator>(m, "ExtentIterator",
                               "Extents in disk order; the walk runs in C++ without the GIL. An "
                               "error met on the way raises qcowmap.Error after the extents "
                               "before it.")
        .def("__iter__", [](py::object self) { return self; })
        .def("__next__", &ExtentIterator::next);

    py::class_<PyImage>(m, "Image",
                        "A qcow2 image opened read-only through a memory mapping "
                        "(qcowmap.open). Immutable: share it across threads.")
        .def_property_readonly("size", &PyImage::size,
                               "The virtual disk size in bytes (the snapshot's when one was "
                               "opened).")
        .def_property_readonly(
            "path", [](const PyImage& i) { return text(i.filename()); }, "The path as opened.")
        .def_property_readonly("info", &PyImage::info,
                               "What `qcowmap info --output=json PATH` prints, as a dict "
                               "(qcowmap::info_json).")
        .def_property_readonly("layers", &PyImage::layers,
                               "The chain as opened, top first: dicts of filename, format, "
                               "virtual-size.")
        .def_property_readonly("closed", &PyImage::closed)
        .def("close", &PyImage::close,
             "Drops this object's reference to the mapping; memoryviews of extents keep theirs.")
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__", [](PyImage& i, const py::args&) { i.close(); })
        .def("extents", &PyImage::extents, py::arg("start") = 0, py::arg("end") = py::none(),
             py::kw_only(), py::arg("prefetch") = true, py::arg("io") = "auto",
             py::arg("threads") = 0,
             "Extents covering [start, min(end, size)), in order. prefetch=True (the default): "
             "data runs come in pieces of at most 1 MiB (256 KiB with io='read'), and from the "
             "first extent whose data the loop reads, the next pieces are read ahead on "
             "`threads` workers (0: one per core) while the loop works: io='mmap' hands out "
             "memoryviews of the mapping whose pages were made present ahead, io='read' "
             "memoryviews of buffers read with pread ahead, io='auto' whichever costs less on "
             "this machine (qcowmap --io=auto). Pages of the mapping the loop has passed are "
             "dropped from the process. prefetch=False: the allocation map's runs whole, data "
             "as views of the mapping read when asked for.")
        .def("dirty_extents", &PyImage::dirty_extents, py::arg("name"), py::arg("start") = 0,
             py::arg("end") = py::none(),
             "The extents of the dirty ranges of persistent bitmap `name` only (what an "
             "incremental backup copies).")
        .def("read", &PyImage::read, py::arg("offset"), py::arg("length"),
             "`length` bytes of the virtual disk at `offset`: fewer only at the end of the disk.")
        .def("readinto", &PyImage::readinto, py::arg("offset"), py::arg("buffer"),
             "Fills the writable `buffer` from `offset`; returns the bytes copied (fewer only "
             "at the end of the disk).")
        .def("map", &PyImage::map, py::arg("start") = 0, py::arg("length") = py::none(),
             "The entries of `qemu-img map --output=json` as dicts.")
        .def("bitmaps", &PyImage::bitmaps, "What `qcowmap bitmaps --output=json` prints, as dicts.")
        .def("hash", &PyImage::hash, py::arg("algo") = "sha256", py::arg("block_size") = py::none(),
             py::arg("threads") = 0, py::arg("progress") = py::none(),
             "The hex digest of the whole virtual disk (sha256, sha512, blake2b512, xxh3-128 "
             "as sha256sum & co. give it for the raw disk; blkhash-sha256, blkhash-sha512, "
             "blkhash-blake2b512 as blksum gives it, at the cost of the allocated data), or "
             "with block_size the block manifest (not the blkhash algorithms): dicts of index, "
             "offset, length, digest, zero. threads 0: one per core. progress: called as "
             "progress(done, total) in bytes of the disk, at most every 50 ms and once at the "
             "end. Ctrl-C (any signal handler that raises) stops it within about 50 ms of work.")
        .def(
            "open_raw",
            [](py::object self) { return py::module_::import("qcowmap").attr("RawDisk")(self); },
            "The virtual disk as a read-only, seekable io.RawIOBase (qcowmap.RawDisk).")
        .def("_sequential_reader", &PyImage::sequential_reader, py::arg("io") = "auto",
             py::arg("threads") = 0,
             "RawDisk's reader: sequential reads continue a read-ahead walk.")
        .def("__repr__", [](const PyImage& i) {
            return fmt::format("<qcowmap.Image '{}'{}>", i.filename(),
                               i.closed() ? " (closed)" : fmt::format(" size={}", i.size()));
        });

    m.def("open", &open_image, py::arg("path"), py::arg("snapshot") = py::none(),
          py::arg("backing") = true, py::arg("data_file") = py::none(),
          py::arg("untrusted") = false, py::arg("force_share") = false,
          "Opens and validates a qcow2 (or qcow v1) image, its backing chain and data file. "
          "snapshot: an internal snapshot's ID or name; backing=False reads only this image; "
          "data_file: use this external data file; untrusted=True: the image came from outside; "
          "backing and data file names it holds are followed only inside its directory (as "
          "--untrusted). QEMU's image locks: by default the image is opened as qemu-img opens "
          "it, as a reader that lets nobody write until the Image is closed, and an image a "
          "writer (a running VM, qemu-io) holds raises qcowmap.Error (code 'image_in_use'); "
          "force_share=True (qemu-img -U) takes no locks, and reads of an image that changes "
          "meanwhile fail with code 'image_changed' where noticed.");
    m.def("stream_convert", &stream_convert, py::arg("fileobj"), py::arg("target"), py::kw_only(),
          py::arg("replace") = false, py::arg("max_spool") = py::none(),
          py::arg("expect_checksum") = py::none(), py::arg("backing") = true,
          py::arg("data_file") = py::none(), py::arg("threads") = 0,
          "Reads a qcow2 image once from fileobj (a binary file object: a pipe, an HTTP "
          "response; readinto or read) and writes its virtual disk raw to target, which "
          "appears complete or not at all (replace=True replaces an existing file). "
          "Clusters that arrive before their tables are spooled in $TMPDIR, at most max_spool "
          "bytes (default: the disk size). expect_checksum='sha256:HEX' checks the digest of "
          "the bytes read. backing=False reads an image that names a backing file alone "
          "(otherwise it is refused); data_file: the external data file, for an image that "
          "has one. Returns the decoder's statistics as a dict.");

    py::class_<PyWritable>(m, "WritableImage",
                           "A qcow2 image opened for writing in place (qcowmap.open(path, "
                           "writable=True)). Reads see every write; calls from several threads "
                           "are serialised.")
        .def_property_readonly("size", &PyWritable::size, "The virtual disk size in bytes.")
        .def_property_readonly(
            "path", [](const PyWritable& w) { return text(w.filename()); }, "The path as opened.")
        .def_property_readonly("closed", &PyWritable::closed)
        .def("read", &PyWritable::read, py::arg("offset"), py::arg("length"),
             "`length` bytes of the disk at `offset` as written so far (fewer at the end).")
        .def("readinto", &PyWritable::readinto, py::arg("offset"), py::arg("buffer"),
             "Fills the writable `buffer` from `offset`; returns the bytes copied.")
        .def("write", &PyWritable::write, py::arg("offset"), py::arg("data"),
             "Writes `data` (any contiguous buffer: bytes, bytearray, memoryview...) at "
             "`offset`; returns its length. Raises qcowmap.Error past the end of the disk.")
        .def("write_zeroes", &PyWritable::write_zeroes, py::arg("offset"), py::arg("length"),
             py::arg("unmap") = false,
             "Makes the range read as zeros (whole clusters freed when `unmap`).")
        .def("discard", &PyWritable::discard, py::arg("offset"), py::arg("length"),
             "Discards the range as qemu does (whole clusters inside it are freed).")
        .def("flush", &PyWritable::flush,
             "Makes every write so far durable, in the crash-safe order.")
        .def("resize", &PyWritable::resize, py::arg("size"),
             "Changes the virtual size (grow; shrink only an unallocated tail).")
        .def("block_status", &PyWritable::block_status, py::arg("offset"), py::arg("length"),
             "The first run of equal allocation from `offset`: dict of offset, length, "
             "allocated (this image decides the content), zero.")
        .def("snapshot", &PyWritable::snapshot,
             "Flushes and returns a read-only qcowmap.Image of the file as it is now (for "
             "extents(), map(), hash()...).")
        .def("close", &PyWritable::close,
             "Flushes, stores persistent bitmaps and releases the file and its locks.")
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__", [](PyWritable& w, const py::args&) { w.close(); })
        .def(
            "open_raw",
            [](py::object self) { return py::module_::import("qcowmap").attr("RawDisk")(self); },
            "The virtual disk as a readable, writable, seekable io.RawIOBase (qcowmap.RawDisk).")
        .def("__repr__", [](const PyWritable& w) {
            return fmt::format("<qcowmap.WritableImage '{}'{}>", w.filename(),
                               w.closed() ? " (closed)" : fmt::format(" size={}", w.size()));
        });
    m.def("_open_writable", &open_writable, py::arg("path"), py::arg("backing") = true,
          py::arg("data_file") = py::none(), py::arg("untrusted") = false, py::arg("lock") = true);
    m.def("_create", &create_image, py::arg("path"), py::arg("size"), py::arg("options"));
}
