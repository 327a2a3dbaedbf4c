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

PACOFR_HD float score_of(float dot, float term, bool cosine) {
#if defined(__CUDA_ARCH__)
  return cosine ? __fmul_rn(-dot, term) : __fsub_rn(term, dot);
#else
  return cosine ? -dot * term : term - dot;
#endif
}

// Row (inside the warp tile) of list slot `slot` of lane `lane`.
PACOFR_HD int list_row(int lane, int slot) {
  return 16 * (slot >> 1) + mma::accumulator_position(lane, 2 * (slot & 1)).row;
}

// Insert one code tile's scores into this lane's row lists. term_at(code) gives the code term;
// codes at or beyond n_codes (the ragged last tile) are skipped.
template <int KP, int M_TILES, int N_TILES, typename TermAt>
PACOFR_HD void insert_tile_scores(int lane, const float (&acc)[M_TILES][N_TILES][4], int64_t code_base,
                                  int64_t n_codes, const TermAt& term_at, bool cosine, NanRank nan_rank,
                                  Key (&lists)[2 * M_TILES][KP]) {
#pragma unroll
  for (int ni = 0; ni < N_TILES; ++ni) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t code = code_base + 8 * ni + mma::accumulator_position(lane, half).byte;
      if (code >= n_codes) continue;
      const float term = term_at(code);
#pragma unroll
      for (int mi = 0; mi < M_TILES; ++mi) {
#pragma unroll
        for (int row_half = 0; row_half < 2; ++row_half) {
          const float score = score_of(acc[mi][ni][2 * row_half + half], term, cosine);
          insert_key<KP>(lists[2 * mi + row_half], make_key(score, static_cast<uint32_t>(code), nan_rank));
        }
      }
    }
  }
}

// nearest_token's reported distance of a score (see pacofr/ops/nearest_token.py):
// l2 max(||x||^2 + 2 score, 0); cosine 1 + score / ||x|| (a zero row has distance 1).
PACOFR_HD float reported_distance(float score, float squared_norm, bool cosine) {
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
