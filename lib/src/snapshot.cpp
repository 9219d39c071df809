// The snapshot table (spec "Snapshots"; qemu's block/qcow2-snapshot.c qcow2_do_read_snapshots)
// and the selection of a snapshot to read instead of the active disk.
#include "cluster.hpp"
#include "parsers.hpp"

namespace qcowmap::detail {
namespace {

/// The `length` bytes at `offset` of `file`: a view of the file or, with `zero_fill`, a copy in
/// `scratch` whose part past the end of the file reads as zeros, as qemu's block layer reads a
/// file cut short (bdrv_aligned_preadv). Callers bound `length` (at most 64 KiB + 1 KiB).
Result<Bytes> table_bytes(Bytes file, std::uint64_t offset, std::uint64_t length, bool zero_fill,
                          std::vector<std::byte>& scratch, std::string_view what) {
    if (!zero_fill || fits(file.size(), offset, length)) {
        return slice(file, offset, length, what);
    }
    scratch.assign(static_cast<std::size_t>(length), std::byte{0});
    if (offset < file.size()) {
        const std::uint64_t present = std::min<std::uint64_t>(length, file.size() - offset);
        std::copy_n(file.data() + offset, present, scratch.data());
    }
    return Bytes(scratch);
}

} // namespace

/// The snapshot table (qcow2-snapshot.c qcow2_do_read_snapshots): variable-length entries,
/// each 8-byte aligned, at most 64 MiB in all, extra data at most 1 KiB per entry. In check
/// mode (`zero_fill`), bytes past the end of the file read as zeros, as they do for qemu.
Result<void> parse_snapshot_table(ImageState& state, bool zero_fill) {
    ImageInfo& info = state.info;
    std::uint64_t at = info.snapshots_offset;
    std::vector<std::byte> scratch;
    info.snapshots.reserve(
        std::min<std::uint64_t>(info.snapshot_count, state.bytes.size() / kSnapshotEntryFixed + 1));
    for (std::uint32_t i = 0; i < info.snapshot_count; ++i) {
        at = align_up8(at);
        auto fixed = table_bytes(state.bytes, at, kSnapshotEntryFixed, zero_fill, scratch,
                                 fmt::format("snapshot table entry {}", i));
        if (!fixed) {
            return std::move(fixed).error();
        }
        const SnapshotFixed d = decode_snapshot_entry(fixed->data());
        Snapshot snap;
        snap.l1_table_offset = d.l1_table_offset;
        snap.l1_size = d.l1_size;
        snap.date_seconds = d.date_seconds;
        snap.date_nanoseconds = d.date_nanoseconds;
        snap.vm_clock_nanoseconds = d.vm_clock_nanoseconds;
        snap.vm_state_size = d.vm_state_size;
        snap.extra_data_size = d.extra_data_size;
        snap.virtual_size = info.virtual_size;
        if (snap.extra_data_size > kMaxSnapshotExtraData) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("snapshot table entry {} has {} bytes of extra data (at most "
                                     "{})",
                                     i, snap.extra_data_size, kMaxSnapshotExtraData)};
        }
        auto extra =
            table_bytes(state.bytes, at + kSnapshotEntryFixed, snap.extra_data_size, zero_fill,
                        scratch, fmt::format("snapshot table entry {} extra data", i));
        if (!extra) {
            return std::move(extra).error();
        }
        using namespace snapshot_extra;
        if (snap.extra_data_size >= kVmStateSize + 8)
            snap.vm_state_size = load_be64(*extra, kVmStateSize);
        if (snap.extra_data_size >= kDiskSize + 8)
            snap.virtual_size = load_be64(*extra, kDiskSize);
        // An icount of -1 means none was recorded (qemu writes it outside replay mode).
        if (snap.extra_data_size >= kIcount + 8 && load_be64(*extra, kIcount) != UINT64_MAX) {
            snap.icount = load_be64(*extra, kIcount);
        }
        const std::uint64_t strings_at = at + kSnapshotEntryFixed + snap.extra_data_size;
        auto strings =
            table_bytes(state.bytes, strings_at, std::uint64_t{d.id_size} + d.name_size, zero_fill,
                        scratch, fmt::format("snapshot table entry {} ID and name", i));
        if (!strings) {
            return std::move(strings).error();
        }
        snap.id = std::string(as_text(strings->subspan(0, d.id_size)));
        snap.name = std::string(as_text(strings->subspan(d.id_size, d.name_size)));
        at = strings_at + d.id_size + d.name_size;
        if (at - info.snapshots_offset > kMaxSnapshotTableBytes) {
            return Error{ErrorCode::invalid_table,
                         fmt::format("snapshot table is larger than qemu's limit of {:#x} bytes",
                                     kMaxSnapshotTableBytes)};
        }
        info.snapshots.push_back(std::move(snap));
    }
    return {};
}

Result<void> select_snapshot(ImageState& state, const std::string& wanted) {
    const Snapshot* found = nullptr;
    for (const Snapshot& snap : state.info.snapshots) {
        if (snap.id == wanted) {
            found = &snap;
            break;
        }
    }
    for (const Snapshot& snap : state.info.snapshots) {
        if (!found && snap.name == wanted) {
            found = &snap;
        }
    }
    if (!found) {
        return Error{ErrorCode::invalid_argument,
                     fmt::format("no snapshot with ID or name '{}' ({} snapshot{})",
                                 printable(wanted), state.info.snapshots.size(),
                                 state.info.snapshots.size() == 1 ? "" : "s")};
    }
    auto l1 = l1_table(state, found->l1_table_offset, found->l1_size, found->virtual_size,
                       fmt::format("L1 table of snapshot '{}'", printable(found->name)));
    if (!l1) {
        return std::move(l1).error();
    }
    state.l1_table = *l1;
    state.disk_size = found->virtual_size;
    return {};
}

} // namespace qcowmap::detail
