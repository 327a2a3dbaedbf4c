// Deterministic per-code reductions over entries sorted by code (the codebook gradient of
// soft_assign and the deterministic codebook_stats), split across blocks whatever the skew.
//
// The sorted entries are cut into fixed chunks of kChunkEntries positions; the cut depends only on
// the number of entries, never on scheduling, and every sum runs in one fixed order:
//   pass 1 (reduce_chunk_column): per (chunk, column), walk the chunk's entries in sorted order;
//     a code whose whole segment lies in the chunk is written to the output, the part of a
//     segment that began in an earlier chunk goes to the chunk's head partial, the part of one that
//     began here and continues goes to the chunk's tail partial;
//   pass 2 (finish_tail_column): per (chunk, column) whose last segment began there and continues,
//     tail partial + the head partials of the following chunks it covers, in chunk order.
// Entries whose code is outside [0, K) are skipped (they sort before position starts[0] or after
// starts[K]), the same rule as the atomic paths. Codes without entries are not written (the
// caller zero-fills). Host-testable: csrc/host_tests/host_logic_driver.cpp runs both passes.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace pacofr {
namespace segments {

constexpr int32_t kChunkEntries = 128;

enum class Part : int { kWhole = 0, kHead = 1, kTail = 2 };

PACOFR_HD Part classify(int64_t segment_begin, int64_t segment_end, int64_t chunk_begin, int64_t chunk_end) {
  if (segment_begin < chunk_begin) return Part::kHead;
  return segment_end > chunk_end ? Part::kTail : Part::kWhole;
}

PACOFR_HD bool code_in_range(int64_t code, int64_t num_codes) { return code >= 0 && code < num_codes; }

struct SortedEntries {
  const int64_t* codes;   // (E,) codes in ascending order (stable sort)
  const int64_t* starts;  // (K + 1,) first position of each code: searchsorted(codes, 0..K)
  int32_t num_entries;    // E < 2^31
  int64_t num_codes;      // K

  PACOFR_HD int32_t chunk_begin(int32_t chunk) const { return chunk * kChunkEntries; }
  PACOFR_HD int32_t chunk_end(int32_t chunk) const {
    const int64_t end = static_cast<int64_t>(chunk + 1) * kChunkEntries;
    return end < num_entries ? static_cast<int32_t>(end) : num_entries;
  }
};

// Pass 1 for one (chunk, column). value(position, code, column) is the entry's contribution (float,
// or double where sums must stay exact beyond 2^24, e.g. counts); sums are kept in its type;
// store(part, chunk, code, column, sum) writes a whole result or a partial.
template <typename Value, typename Store>
PACOFR_HD void reduce_chunk_column(const SortedEntries& entries, int32_t chunk, int32_t column, const Value& value,
                                   const Store& store) {
  const int32_t begin = entries.chunk_begin(chunk), end = entries.chunk_end(chunk);
  using Sum = decltype(value(int32_t{0}, int64_t{0}, int32_t{0}));
  Sum sum = 0;
  for (int32_t p = begin; p < end; ++p) {
    const int64_t code = entries.codes[p];
    if (!code_in_range(code, entries.num_codes)) continue;
    sum += value(p, code, column);
    if (p + 1 == end || entries.codes[p + 1] != code) {
      store(classify(entries.starts[code], entries.starts[code + 1], begin, end), chunk, code, column, sum);
      sum = 0;
    }
  }
}

// Pass 2 for one (chunk, column). partial(part, chunk, column) reads what pass 1 stored;
// store(code, column, total) writes the result of the segment that begins in `chunk` and continues.
template <typename Partial, typename Store>
PACOFR_HD void finish_tail_column(const SortedEntries& entries, int32_t chunk, int32_t column, const Partial& partial,
                                  const Store& store) {
  const int32_t begin = entries.chunk_begin(chunk), end = entries.chunk_end(chunk);
  if (end <= begin) return;
  const int64_t code = entries.codes[end - 1];
  if (!code_in_range(code, entries.num_codes)) return;
  const int64_t segment_end = entries.starts[code + 1];
  if (classify(entries.starts[code], segment_end, begin, end) != Part::kTail) return;
  auto total = partial(Part::kTail, chunk, column);  // the type pass 1 summed in
  const int32_t last = static_cast<int32_t>((segment_end - 1) / kChunkEntries);
  for (int32_t c = chunk + 1; c <= last; ++c) total += partial(Part::kHead, c, column);
  store(code, column, total);
}

}  // namespace segments
}  // namespace pacofr
