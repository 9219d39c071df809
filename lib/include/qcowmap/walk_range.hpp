// qcowmap — the one iteration protocol: a fallible walk presented as a C++20 input range.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "qcowmap needs C++20: compile with -std=c++20 (Meson: cpp_std=c++20)"
#endif

#include <qcowmap/result.hpp>

#include <cstddef>
#include <iterator>
#include <optional>
#include <utility>

namespace qcowmap {

/// A single-pass range over what a fallible walk produces, shaped like
/// `std::ranges::istream_view`: `std::ranges::input_range` holds, range-for works and views
/// compose (`walk | std::views::filter(...)`), and whether the walk stopped early is read from
/// the range after the loop:
/// \code
///   auto extents = image.extents();
///   for (const qcowmap::Extent& e : extents) { ... }
///   if (extents.error()) report(extents.error()->message);
/// \endcode
/// `begin()` produces the first value; each increment produces the next (or, stepping by hand,
/// each `next(out)` call). After the first error
/// the walk stays failed and yields nothing more (LLVM's fallible_iterator, dav1d's sticky
/// error). The range is movable but not copyable-in-flight: iterators point to the range, so do
/// not move it while iterating.
///
/// `Walk` is the machinery: `using value_type = ...; bool next(value_type&);` (false at the end
/// or on error) and `const std::optional<Error>& error() const`.
template <typename Walk> class WalkRange {
  public:
    using value_type = typename Walk::value_type;

    /// The range's input iterator; compare it with `std::default_sentinel`.
    class iterator {
      public:
        using value_type = typename Walk::value_type;
        using difference_type = std::ptrdiff_t;
        using iterator_concept = std::input_iterator_tag;

        iterator() = default;
        const value_type& operator*() const { return range_->current_; }
        const value_type* operator->() const { return &range_->current_; }
        iterator& operator++() {
            range_->advance();
            return *this;
        }
        void operator++(int) { ++*this; }
        friend bool operator==(const iterator& it, std::default_sentinel_t) { return it.at_end(); }

      private:
        bool at_end() const { return range_ == nullptr || range_->done_; }
        friend class WalkRange;
        explicit iterator(WalkRange* range) : range_(range) {}
        WalkRange* range_ = nullptr;
    };

    explicit WalkRange(Walk walk) : walk_(std::move(walk)) {}

    /// Produces the first value (only the first call does: the range is single-pass).
    iterator begin() {
        if (!started_) {
            started_ = true;
            advance();
        }
        return iterator(this);
    }
    std::default_sentinel_t end() const { return {}; }

    /// Steps the walk by hand, for consumers that cannot hold an iterator across calls (a Python
    /// or C iterator, a loop that merges two walks): the next value into `out`, false at the
    /// end or once the walk failed (`error()` says which). The first call produces the first
    /// value, as `begin()` does; do not mix the two ways on one range.
    bool next(value_type& out) {
        if (!started_) {
            started_ = true;
            advance();
        } else if (!done_) {
            advance();
        }
        if (done_)
            return false;
        out = current_;
        return true;
    }

    /// Why the walk stopped early, or nullopt when it ran to the end (or has not failed yet).
    const std::optional<Error>& error() const { return walk_.error(); }

    /// The machinery, for the library's own consumers that need more than the values.
    const Walk& walk() const { return walk_; }

  private:
    void advance() { done_ = !walk_.next(current_); }

    Walk walk_;
    value_type current_{};
    bool started_ = false;
    bool done_ = false;
};

} // namespace qcowmap
