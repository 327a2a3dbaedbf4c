// (score, index) keys and the top-k lists of the code-ranking kernels.
//
// A candidate is one 64-bit key: the order-preserving bits of its fp32 score in the high word and
// its code index in the low word, so the unsigned order of keys is the lexicographic order of
// (score, index): the smaller score wins, and among equal scores the smaller index, whatever order
// the candidates arrive in. -0.0 and +0.0 give one key (they compare equal). A NaN score either
// ranks after every number (`NanRank::kLast`, nearest_token) or exactly like +inf
// (`NanRank::kAsInfinity`, soft_assign ranks NaN like the lowest value, -inf, on a negated score).
//
// A list is KP keys in ascending order (KP a power of two, 1..16), padded with kEmptyKey, which is
// above every real key (real indices are below 2^31). Everything here is host-testable
// (csrc/host_tests/host_logic_driver.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace pacofr {
namespace rank {

using Key = unsigned long long;

constexpr Key kEmptyKey = ~0ull;
constexpr uint32_t kPositiveInfinityBits = 0x7F800000u;

enum class NanRank : int {
  kLast = 0,        // NaN after +inf (nearest_token)
  kAsInfinity = 1,  // NaN ties with +inf (soft_assign, whose score is the negated value)
};

// The bits of `from` reinterpreted as a `To` of the same size (memcpy works in device code too).
template <typename To, typename From>
PACOFR_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

PACOFR_HD uint32_t float_to_bits(float value) { return bit_cast<uint32_t>(value); }
PACOFR_HD float bits_to_float(uint32_t bits) { return bit_cast<float>(bits); }

// Monotone map of IEEE order onto unsigned order: a < b  <=>  ordered(a) < ordered(b) for numbers.
PACOFR_HD uint32_t ordered_bits(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

PACOFR_HD uint32_t score_word(float score, NanRank nan_rank) {
  if (score != score) {
    return nan_rank == NanRank::kLast ? 0xFFFFFFFFu : ordered_bits(kPositiveInfinityBits);
  }
  if (score == 0.0f) score = 0.0f;  // -0.0 -> +0.0
  return ordered_bits(float_to_bits(score));
}

PACOFR_HD Key make_key(float score, uint32_t index, NanRank nan_rank) {
  return (static_cast<Key>(score_word(score, nan_rank)) << 32) | index;
}

// The score a key was made from (NaN for a kLast NaN key; +inf for a kAsInfinity one).
PACOFR_HD float key_score(Key key) {
  const uint32_t word = static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (word & 0x80000000u) ? (word & 0x7FFFFFFFu) : ~word;
  return bits_to_float(bits);
}

PACOFR_HD uint32_t key_index(Key key) { return static_cast<uint32_t>(key & 0xFFFFFFFFull); }

PACOFR_HD Key min_key(Key a, Key b) { return a < b ? a : b; }
PACOFR_HD Key max_key(Key a, Key b) { return a < b ? b : a; }

template <int KP>
PACOFR_HD void clear_list(Key (&list)[KP]) {
#pragma unroll
  for (int j = 0; j < KP; ++j) list[j] = kEmptyKey;
}

// Insert `key` into the ascending list (keys distinct), dropping the largest; no-op when `key` is
// not below the list's last key. Branch-free network after that one test.
template <int KP>
PACOFR_HD void insert_key(Key (&list)[KP], Key key) {
  if (!(key < list[KP - 1])) return;
#pragma unroll
  for (int j = KP - 1; j > 0; --j) {  // descending j: list[j - 1] and list[j] are still the old values
    const Key previous = list[j - 1];
    list[j] = key < previous ? previous : (key < list[j] ? key : list[j]);
  }
  list[0] = min_key(list[0], key);
}

// The KP smallest keys of two ascending lists (disjoint keys), ascending, into `list`: the
// element-wise minimum of one list and the other reversed is bitonic; a bitonic sorting network
// then orders it. Branch-free.
template <int KP>
PACOFR_HD void merge_lists(Key (&list)[KP], const Key (&other)[KP]) {
#pragma unroll
  for (int j = 0; j < KP; ++j) list[j] = min_key(list[j], other[KP - 1 - j]);
#pragma unroll
  for (int stride = KP / 2; stride > 0; stride /= 2) {
#pragma unroll
    for (int j = 0; j < KP; ++j) {
      if ((j & stride) == 0) {
        const Key low = min_key(list[j], list[j + stride]);
        const Key high = max_key(list[j], list[j + stride]);
        list[j] = low;
        list[j + stride] = high;
      }
    }
  }
}

}  // namespace rank
}  // namespace pacofr
