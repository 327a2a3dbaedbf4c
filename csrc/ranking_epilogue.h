// The top-k epilogue of the tensor-core code ranking (csrc/code_ranking_kernel.h), host-testable:
// turning one lane's accumulators of a code tile into (score, index) keys of its rows' lists, and
// the reported distance of nearest_token. csrc/host_tests/host_logic_driver.cpp runs it for a
// whole emulated warp, merges included.
//
// A warp tile is M_TILES x 16 query rows by N_TILES x 8 codes; lane l holds accumulator register
// r of MMA tile (mi, ni) at row 16*mi + l/4 + 8*(r/2), code 8*ni + 2*(l%4) + r%2, so it keeps
// 2 * M_TILES row lists (slot s = 2*mi + r/2) of KP keys each.
//
// Scores, from the fp32 dot product x.e and a per-code term (computed by the launcher):
//   l2      score = term - dot    with term = 0.5 ||e||^2  (nearest_token, soft_assign l2)
//   cosine  score = -dot * term   with term = 1 / ||e|| (0 for a zero row) for nearest_token, or
//                                 1 / max(||e||, eps) for soft_assign
// so a smaller score is a better code in both ops.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "mma_layout.h"
#include "rank_keys.h"

namespace pacofr {
namespace rank {

// A code's score as one fused multiply-add, score = offset - dot * scale: l2 (offset term, scale 1)
// is term - dot rounded once, exactly the subtraction; cosine (offset 0, scale term) is -dot * term
// rounded once, where +0 is added to a zero product (-0 + 0 = +0), and -0 and +0 rank alike. The two
// factors are picked once per code, so a score costs one FFMA whatever the kind.
struct ScoreFactors {
  float offset, scale;
};

PACOFR_HD ScoreFactors score_factors(float term, bool cosine) {
  return cosine ? ScoreFactors{0.0f, term} : ScoreFactors{term, 1.0f};
}

PACOFR_HD float score_of(float dot, ScoreFactors factors) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(-dot, factors.scale, factors.offset);
#else
  return std::fma(-dot, factors.scale, factors.offset);
#endif
}

// The NaN rule as one min: min(score, cap) with cap = +inf for kAsInfinity maps a NaN score to +inf
// and leaves numbers as they are; cap = NaN for kLast leaves every score as it is (fmin returns the
// other operand when one is NaN). One FMNMX per score, picked once per call, no second loop copy.
PACOFR_HD float nan_cap(NanRank nan_rank) {
  return bits_to_float(nan_rank == NanRank::kAsInfinity ? kPositiveInfinityBits : 0x7FC00000u);
}

PACOFR_HD float apply_nan_rule(float score, float cap) {
#if defined(__CUDA_ARCH__)
  return fminf(score, cap);
#else
  return std::fmin(score, cap);
#endif
}

// Row (inside the warp tile) of list slot `slot` of lane `lane`.
PACOFR_HD int list_row(int lane, int slot) {
  return 16 * (slot >> 1) + mma::accumulator_position(lane, 2 * (slot & 1)).row;
}

// fn(ni, half, code, term) for each of this lane's codes of the tile (accumulator column 8 ni +
// 2 (lane % 4) + half), in increasing code order; codes at or beyond n_codes (the ragged last
// tile) are skipped. Slot s of a lane is row 16 (s / 2) + lane / 4 + 8 (s % 2) of the warp tile.
template <int N_TILES, typename TermAt, typename Fn>
PACOFR_HD void for_each_lane_code(int lane, int64_t code_base, int64_t n_codes, const TermAt& term_at, const Fn& fn) {
#pragma unroll
  for (int ni = 0; ni < N_TILES; ++ni) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t code = code_base + 8 * ni + mma::accumulator_position(lane, half).byte;
      if (code >= n_codes) continue;
      fn(ni, half, code, term_at(code));
    }
  }
}

// fn(slot, code, score) for every score of this lane's codes of the tile (increasing codes), with the
// NaN rule applied (kAsInfinity: NaN -> +inf) and the score factors picked once per code.
template <int M_TILES, int N_TILES, typename TermAt, typename Fn>
PACOFR_HD void for_each_lane_score(int lane, const float (&acc)[M_TILES][N_TILES][4], int64_t code_base,
                                   int64_t n_codes, const TermAt& term_at, bool cosine, NanRank nan_rank,
                                   const Fn& fn) {
  const float cap = nan_cap(nan_rank);
  for_each_lane_code<N_TILES>(lane, code_base, n_codes, term_at, [&](int ni, int half, int64_t code, float term) {
    const ScoreFactors factors = score_factors(term, cosine);
#pragma unroll
    for (int slot = 0; slot < 2 * M_TILES; ++slot) {
      fn(slot, code, apply_nan_rule(score_of(acc[slot >> 1][ni][2 * (slot & 1) + half], factors), cap));
    }
  });
}

// Whether `score` (of a later code) goes before `best` (of an earlier one) in the key order, for
// scores already mapped by nan_rank (kAsInfinity: NaN -> +inf; kLast: NaN stays NaN): smaller
// first, a number before NaN, and among equal scores (-0 == +0) the earlier code. "Not (score >=
// best)" is true for score < best and for any NaN operand; "score == score" then removes a NaN
// score, leaving a number against a NaN best: two predicate instructions.
PACOFR_HD bool better_than(float score, float best) {
  return !(score >= best) && score == score;
}

// k = 1: the best of this lane's codes of the tile for each row kept as an fp32 (score, code) pair
// (the lane's codes arrive in increasing order), then one key per row into its one-key list. The
// pair starts as (NaN, the lane's first code): any number replaces it, and a NaN-only row keeps its
// first code, as the key order does. Per score: one FFMA, one FMNMX (the NaN rule), the two
// predicates of better_than and two selects.
template <int M_TILES, int N_TILES, typename TermAt>
PACOFR_HD void insert_tile_best(int lane, const float (&acc)[M_TILES][N_TILES][4], int64_t code_base,
                                int64_t n_codes, const TermAt& term_at, bool cosine, NanRank nan_rank,
                                Key (&lists)[2 * M_TILES][1]) {
  const int64_t first_code = code_base + mma::accumulator_position(lane, 0).byte;
  if (first_code >= n_codes) return;  // codes grow along the loops below: none of this lane's is real
  float best[2 * M_TILES];
  uint32_t best_code[2 * M_TILES];
#pragma unroll
  for (int slot = 0; slot < 2 * M_TILES; ++slot) {
    best[slot] = bits_to_float(0x7FC00000u);  // NaN
    best_code[slot] = static_cast<uint32_t>(first_code);
  }
  for_each_lane_score<M_TILES, N_TILES>(lane, acc, code_base, n_codes, term_at, cosine, nan_rank,
                                        [&](int slot, int64_t code, float score) {
    const bool better = better_than(score, best[slot]);
    best[slot] = better ? score : best[slot];
    best_code[slot] = better ? static_cast<uint32_t>(code) : best_code[slot];
  });
#pragma unroll
  for (int slot = 0; slot < 2 * M_TILES; ++slot) {
    lists[slot][0] = min_key(lists[slot][0], make_key(best[slot], best_code[slot], nan_rank));
  }
}

// k > 1: every score of the tile into its row's list. A score goes on to the key and the insertion
// only when it is not above the score of the list's last key as the tile began (the lists only
// improve, so that bound is safe): "not (score > bound)", one predicate, is also true when the bound
// is NaN (an empty or NaN last key) and for a NaN score, whose key insert_key then places or drops.
// After the first tiles most scores stop at this fp32 filter, as FAISS's WarpSelect filters against
// its queue's largest.
template <int KP, int M_TILES, int N_TILES, typename TermAt>
PACOFR_HD void insert_tile_keys(int lane, const float (&acc)[M_TILES][N_TILES][4], int64_t code_base,
                                int64_t n_codes, const TermAt& term_at, bool cosine, NanRank nan_rank,
                                Key (&lists)[2 * M_TILES][KP]) {
  float bound[2 * M_TILES];
#pragma unroll
  for (int slot = 0; slot < 2 * M_TILES; ++slot) bound[slot] = key_score(lists[slot][KP - 1]);
  for_each_lane_score<M_TILES, N_TILES>(lane, acc, code_base, n_codes, term_at, cosine, nan_rank,
                                        [&](int slot, int64_t code, float score) {
    if (!(score > bound[slot])) insert_key<KP>(lists[slot], make_key(score, static_cast<uint32_t>(code), nan_rank));
  });
}

// Insert one code tile's scores into this lane's row lists. term_at(code) gives the code term;
// codes at or beyond n_codes (the ragged last tile) are skipped.
template <int KP, int M_TILES, int N_TILES, typename TermAt>
PACOFR_HD void insert_tile_scores(int lane, const float (&acc)[M_TILES][N_TILES][4], int64_t code_base,
                                  int64_t n_codes, const TermAt& term_at, bool cosine, NanRank nan_rank,
                                  Key (&lists)[2 * M_TILES][KP]) {
  if constexpr (KP == 1) {
    insert_tile_best<M_TILES, N_TILES>(lane, acc, code_base, n_codes, term_at, cosine, nan_rank, lists);
  } else {
    insert_tile_keys<KP, M_TILES, N_TILES>(lane, acc, code_base, n_codes, term_at, cosine, nan_rank, lists);
  }
}

// Largest fp32 squared row norm nearest_token ranks (2^124): a row outside it (NaN, inf, larger)
// reports NaN distances, and so index -1, in every slot (pacofr/ops/nearest_token.py's rule).
constexpr float kMaxSquaredNorm = 2.1267647932558654e37f;  // 2^124

// nearest_token's reported distance of a score (see pacofr/ops/nearest_token.py):
// l2 max(||x||^2 + 2 score, 0); cosine 1 + score / ||x|| (a zero row has distance 1); NaN for a
// row outside kMaxSquaredNorm.
PACOFR_HD float reported_distance(float score, float squared_norm, bool cosine) {
  if (!(squared_norm <= kMaxSquaredNorm)) return bits_to_float(0x7FC00000u);  // NaN
#if defined(__CUDA_ARCH__)
  if (cosine) {
    const float inv_norm = squared_norm > 0.0f ? __fdiv_rn(1.0f, __fsqrt_rn(squared_norm)) : 0.0f;
    return __fadd_rn(1.0f, __fmul_rn(score, inv_norm));
  }
  const float distance = __fadd_rn(squared_norm, __fmul_rn(2.0f, score));
#else
  if (cosine) {
    const float inv_norm = squared_norm > 0.0f ? 1.0f / std::sqrt(squared_norm) : 0.0f;
    return 1.0f + score * inv_norm;
  }
  const float distance = squared_norm + 2.0f * score;
#endif
  return distance < 0.0f ? 0.0f : distance;
}

}  // namespace rank
}  // namespace pacofr
