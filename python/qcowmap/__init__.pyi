# Type stubs for the qcowmap package (the _qcowmap extension and RawDisk).
import io
import os
from typing import Any, BinaryIO, Callable, Iterator, Literal, Optional, Union, overload

__version__: str
"""True when this build's library has OpenOptions::untrusted (open(..., untrusted=True) works)."""

_Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
_WritableBuffer = Union[bytearray, memoryview, Any]

class Error(OSError):
    """An image could not be opened or read."""

    code: str
    """The library's error code name: "io_error", "not_qcow2", "unsupported_version",
    "invalid_header", "unsupported_feature", "encrypted", "invalid_table", "invalid_cluster",
    "compressed_data", "out_of_range", "invalid_argument"."""
    message: str
    """The library's message (str(error) is "FILE: message")."""
    origin: str
    """Which file the error is about: "image", "backing" (a layer of the backing chain),
    "data_file", "target" (an output) or "none"."""
    path: str | None
    """That file's path, when known."""
    refusal: str | None
    """The refusal behind the error, when callers act on it: "untrusted", "no_data_file_name",
    "backing_chain_loop", "backing_chain_depth", "image_changed", "out_of_memory"."""
    errno: int
    """The errno the C API gives for the error (qcowmap::to_errno)."""

class Extent:
    """A run [offset, offset + length) of the virtual disk whose bytes are obtained one way."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def kind(self) -> Literal["data", "zero", "compressed"]: ...
    @property
    def present(self) -> bool:
        """False where no layer allocates the range (qemu-img map's "present")."""
    @property
    def depth(self) -> int:
        """The layer that supplied the range: 0 is the image itself."""
    @property
    def host_offset(self) -> Optional[int]:
        """Where the run starts in its host file, when it has such a place."""
    @property
    def data(self) -> Union[memoryview, bytes, None]:
        """data: a read-only memoryview straight into the mapping (no copy), valid as long as
        the memoryview lives, even after the Image is closed; zero: None; compressed: the
        decompressed bytes of the range (a copy)."""

class ExtentIterator(Iterator[Extent]):
    def __iter__(self) -> "ExtentIterator": ...
    def __next__(self) -> Extent: ...

class RawDisk(io.RawIOBase):
    """The virtual disk as a seekable binary file: read-only for an Image, readable and
    writable for a WritableImage."""

    name: str
    mode: str
    @property
    def size(self) -> int: ...
    def readinto(self, buffer: _WritableBuffer) -> int: ...
    def read(self, size: Optional[int] = -1) -> bytes: ...
    def readall(self) -> bytes: ...
    def seek(self, offset: int, whence: int = 0) -> int: ...
    def tell(self) -> int: ...

class Image:
    """A qcow2 image opened read-only through a memory mapping. Share it across threads."""

    @property
    def size(self) -> int:
        """The virtual disk size in bytes (the snapshot's, when one was opened)."""
    @property
    def path(self) -> str: ...
    @property
    def info(self) -> dict[str, Any]:
        """What `qcowmap info --output=json PATH` prints, as a dict (qcowmap's and qemu-img info's keys)."""
    @property
    def layers(self) -> list[dict[str, Any]]:
        """The chain as opened, top first: {"filename", "format", "virtual-size"}."""
    @property
    def closed(self) -> bool: ...
    def close(self) -> None:
        """Drops this object's reference to the mapping (memoryviews keep theirs)."""
    def __enter__(self) -> "Image": ...
    def __exit__(self, *args: object) -> None: ...
    def extents(
        self,
        start: int = 0,
        end: Optional[int] = None,
        *,
        prefetch: bool = True,
        io: str = "auto",
        threads: int = 0,
    ) -> ExtentIterator:
        """Extents covering [start, min(end, size)), in order."""
    def dirty_extents(self, name: str, start: int = 0, end: Optional[int] = None) -> ExtentIterator:
        """Extents of the dirty ranges of bitmap `name` only."""
    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; fewer only at the end of the disk."""
    def readinto(self, offset: int, buffer: _WritableBuffer) -> int:
        """Fills `buffer` from `offset`; returns the bytes copied (fewer only at the end)."""
    def map(self, start: int = 0, length: Optional[int] = None) -> list[dict[str, Any]]:
        """The entries of `qemu-img map --output=json` (keys start, length, depth, present,
        zero, data, compressed, and offset where the range is readable raw in the file)."""
    def bitmaps(self) -> list[dict[str, Any]]:
        """What `qcowmap bitmaps --output=json` prints: name, granularity, flags, enabled, in-use,
        consistent, usable, error, dirty-bytes."""
    @overload
    def hash(
        self,
        algo: str = "sha256",
        block_size: None = None,
        threads: int = 0,
        progress: Optional[Callable[[int, int], object]] = None,
    ) -> str: ...
    @overload
    def hash(
        self,
        algo: str = "sha256",
        *,
        block_size: int,
        threads: int = 0,
        progress: Optional[Callable[[int, int], object]] = None,
    ) -> list[dict[str, Any]]: ...
    @overload
    def hash(
        self,
        algo: str,
        block_size: int,
        threads: int = 0,
        progress: Optional[Callable[[int, int], object]] = None,
    ) -> list[dict[str, Any]]: ...
    def open_raw(self) -> RawDisk: ...

class WritableImage:
    """A qcow2 image opened for writing in place (open(path, writable=True))."""

    @property
    def size(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` as written so far; fewer only at the end of the disk."""
    def readinto(self, offset: int, buffer: _WritableBuffer) -> int: ...
    def write(self, offset: int, data: Any) -> int:
        """Writes `data` (any contiguous buffer) at `offset`; returns its length."""
    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None:
        """Makes every write so far durable (crash-safe order)."""
    def resize(self, size: int) -> None: ...
    def block_status(self, offset: int, length: int) -> dict[str, Any]:
        """{"offset", "length", "allocated", "zero"} of the first run of equal allocation."""
    def snapshot(self) -> Image:
        """Flushes; a read-only Image of the file as it is now."""
    def close(self) -> None:
        """Flushes, stores persistent bitmaps, releases the file and its locks."""
    def __enter__(self) -> "WritableImage": ...
    def __exit__(self, *args: object) -> None: ...
    def open_raw(self) -> RawDisk: ...

@overload
def open(
    path: _Path,
    snapshot: Optional[str] = None,
    backing: bool = True,
    data_file: Optional[_Path] = None,
    untrusted: bool = False,
    force_share: bool = False,
    writable: Literal[False] = False,
    lock: bool = True,
) -> Image:
    """Opens and validates a qcow2 (or qcow v1) image, its backing chain and data file.

    By default takes QEMU's reader lock (as qemu-img) until the Image is closed; raises Error
    with code "image_in_use" when a writer holds the image. force_share=True: no locks
    (qemu-img -U)."""
@overload
def open(
    path: _Path,
    snapshot: None = None,
    backing: bool = True,
    data_file: Optional[_Path] = None,
    untrusted: bool = False,
    force_share: Literal[False] = False,
    *,
    writable: Literal[True],
    lock: bool = True,
) -> WritableImage:
    """Opens a qcow2 image for writing in place (QEMU's image locks taken unless lock=False)."""

def create(path: _Path, size: int, **options: Any) -> None:
    """Creates an empty qcow2 image, as `qemu-img create -f qcow2 -o KEY=VALUE,...`."""


def stream_convert(
    fileobj: BinaryIO,
    target: _Path,
    *,
    replace: bool = False,
    max_spool: Optional[int] = None,
    expect_checksum: Optional[str] = None,
    backing: bool = True,
    data_file: Optional[_Path] = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Reads a qcow2 image once from a binary file object (a pipe, an HTTP response) and writes
    its virtual disk raw to target, complete or not at all; returns the decoder's statistics."""
