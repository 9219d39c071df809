// The extent walk: classified runs of the chain (cluster.hpp) merged into extents, in order,
// with their bytes in the mapping. Spec: docs/interop/qcow2.txt, "Cluster mapping".
#include "cluster.hpp"
#include "fault.hpp"

#include <algorithm>
#include <utility>

namespace qcowmap {

using detail::ClusterRun;
using detail::ImageState;
using detail::slice;

namespace {

bool mergeable(const Extent& current, const ClusterRun& next) {
    if (current.kind != next.kind || current.kind == ExtentKind::compressed ||
        current.present != next.present || current.depth != next.depth) {
        return false;
    }
    if (current.host_offset.has_value() != next.host_offset.has_value()) {
        return false;
    }
    return !current.host_offset || *current.host_offset + current.length == *next.host_offset;
}

} // namespace

namespace detail {

ExtentWalk::ExtentWalk(std::shared_ptr<const ImageState> state, std::uint64_t start,
                       std::uint64_t end)
    : state_(std::move(state)), position_(start), end_(std::min(end, state_->disk_size)) {}

bool ExtentWalk::fail(Error error) {
    // A table beyond the mapped end, a bad entry: when the file changed under us, that is the
    // cause, not corruption.
    error_ = explain_change(*state_, std::move(error));
    deferred_error_.reset(); // the first error by position is the one that stays
    position_ = end_;
    return false;
}

bool ExtentWalk::next(Extent& out) {
    // The walk reads L1/L2 tables from the mapping: a fault there ends it with an io_error
    // (fault.hpp) like any other error, stickily. One boundary per extent (a few ns).
    FaultBoundary boundary;
    const bool produced = step(out);
    if (auto fault = boundary.finish(state_->path); fault && (produced || boundary.own_fault()))
        return fail(std::move(*fault));
    return produced;
}

bool ExtentWalk::step(Extent& out) {
    if (deferred_error_) {
        return fail(*std::exchange(deferred_error_, std::nullopt));
    }
    if (error_ || position_ >= end_) {
        return false;
    }
    const ImageState& top = *state_;
    auto first = detail::classify_chain(top, 0, position_, end_);
    if (!first) {
        return fail(std::move(first).error());
    }
    const ImageState& s = *first->layer;
    Extent extent;
    extent.offset = position_;
    extent.length = first->length;
    extent.kind = first->kind;
    extent.present = first->present;
    extent.depth = first->depth;
    extent.host_offset = first->host_offset;
    if (first->kind == ExtentKind::compressed) {
        extent.bytes = s.bytes.subspan(first->compressed_host_offset, first->compressed_size);
        extent.compressed_host_offset = first->compressed_host_offset;
        extent.offset_in_cluster = first->offset_in_cluster;
    } else {
        std::uint64_t cursor = position_ + first->length;
        while (cursor < end_) {
            auto run = detail::classify_chain(top, 0, cursor, end_);
            if (!run) {
                // Hand out the good run gathered so far; the error comes with the next call.
                deferred_error_ = std::move(run).error();
                break;
            }
            if (run->layer != first->layer || !mergeable(extent, *run)) {
                break;
            }
            extent.length += run->length;
            cursor += run->length;
        }
        if (extent.kind == ExtentKind::data) {
            auto bytes = slice(s.data_bytes, *extent.host_offset, extent.length, "",
                               ErrorCode::invalid_cluster);
            const std::uint64_t file_size = s.data_bytes.size();
            const std::uint64_t host = *extent.host_offset;
            if (!bytes && host < file_size) {
                // Merged clusters of which only the first lie inside a file cut short: hand
                // those out; the next call fails at the first cluster that does not fit,
                // naming its own virtual offset (not the merged run's start).
                const std::uint64_t fits = file_size - host;
                const std::uint64_t aligned =
                    s.cluster_size ? ((host + fits) & ~(s.cluster_size - 1)) : host + fits;
                if (aligned > host) {
                    extent.length = aligned - host;
                    deferred_error_.reset(); // found again, in order, from the cut on
                    bytes =
                        slice(s.data_bytes, host, extent.length, "", ErrorCode::invalid_cluster);
                }
            }
            if (!bytes) {
                return fail(detail::cluster_error(fmt::format(
                    "data for virtual offset {:#x} at host offset {:#x} (+{:#x}) lies beyond end "
                    "of {} ({:#x})",
                    extent.offset, *extent.host_offset, extent.length,
                    s.data_file ? "the data file" : "file", s.data_bytes.size())));
            }
            extent.bytes = *bytes;
            if (s.data_fd() >= 0) {
                extent.file = FilePosition{s.data_fd(), *extent.host_offset};
            }
        }
    }
    position_ += extent.length;
    out = extent;
    return true;
}

} // namespace detail
} // namespace qcowmap
