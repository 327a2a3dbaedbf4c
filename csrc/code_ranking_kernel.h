// The tensor-core score loop with its top-k epilogue, shared by nearest_token and the soft_assign
// ranking (instantiated in csrc/code_ranking.cu). Shapes and shared-memory layout:
// csrc/ranking_tiles.h; fragment layouts: csrc/mma_layout.h; keys and lists: csrc/rank_keys.h;
// scores: csrc/ranking_epilogue.h.
//
// Per block: the query tile (kRows rows) and a kStages-deep cp.async ring of 64-byte code chunks;
// the flat sequence of (code tile, D chunk) steps is pipelined across code tiles, so the loads of
// the next tile overlap the epilogue of this one. After the last chunk of a code tile each lane
// turns its fp32 accumulators into keys and inserts them into its rows' lists; at the end the four
// lanes sharing a row merge with shuffles, the two warps sharing rows through shared memory, and
// one lane per row writes the k results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "code_ranking.h"
#include "mma_layout.h"
#include "mma_ops.h"
#include "rank_keys.h"
#include "ranking_epilogue.h"
#include "ranking_tiles.h"

namespace pacofr {
namespace ranking {

// ----------------------------------------------------------------------------------------------
// Math of one 32-byte k-slab for a warp tile: A rows at a_base (pitch a_pitch), B codes at b_base
// (pitch b_pitch), both shared-memory addresses of the slab's first byte.
// ----------------------------------------------------------------------------------------------

template <bool kBFloat16>
struct Mma16Bit {
  static constexpr bool kTensorCores = true;

  template <int M_TILES>
  __device__ __forceinline__ static void slab(uint32_t a_base, int a_pitch, uint32_t b_base, int b_pitch, int lane,
                                              float (&acc)[M_TILES][kNTiles][4]) {
    const mma::TileCoord a_src = mma::a_ldmatrix_source(lane);
    const mma::TileCoord b_src = mma::b_ldmatrix_source(lane);
    uint32_t a[M_TILES][4];
#pragma unroll
    for (int mi = 0; mi < M_TILES; ++mi) {
      mma::ldmatrix_x4(a[mi], a_base + (16 * mi + a_src.row) * a_pitch + a_src.byte);
    }
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t b[4];
      mma::ldmatrix_x4(b, b_base + (16 * pair + b_src.row) * b_pitch + b_src.byte);
#pragma unroll
      for (int mi = 0; mi < M_TILES; ++mi) {
        mma::mma_16816<kBFloat16>(acc[mi][2 * pair], a[mi], b[0], b[1]);
        mma::mma_16816<kBFloat16>(acc[mi][2 * pair + 1], a[mi], b[2], b[3]);
      }
    }
  }
};

// fp32 inputs on TF32 tensor cores: one MMA per k8 step, or 3xTF32 (the small parts carry the
// rounding error of the big ones; small*small is dropped).
template <bool kSplit3>
struct MmaTf32 {
  static constexpr bool kTensorCores = true;

  template <int N>
  __device__ __forceinline__ static void split(const uint32_t (&raw)[N], uint32_t (&big)[N], uint32_t (&small)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      big[i] = mma::to_tf32(raw[i]);
      if constexpr (kSplit3) small[i] = mma::to_tf32(__float_as_uint(__uint_as_float(raw[i]) - __uint_as_float(big[i])));
    }
  }

  template <int M_TILES>
  __device__ __forceinline__ static void slab(uint32_t a_base, int a_pitch, uint32_t b_base, int b_pitch, int lane,
                                              float (&acc)[M_TILES][kNTiles][4]) {
    const mma::TileCoord a_src = mma::a_ldmatrix_source(lane);
    const mma::TileCoord b_src = mma::b_ldmatrix_source(lane);
    uint32_t a_big[M_TILES][4], a_small[M_TILES][4];
#pragma unroll
    for (int mi = 0; mi < M_TILES; ++mi) {
      uint32_t raw[4];
      mma::ldmatrix_x4(raw, a_base + (16 * mi + a_src.row) * a_pitch + a_src.byte);
      split(raw, a_big[mi], a_small[mi]);
    }
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t raw[4], b_big[4], b_small[4];
      mma::ldmatrix_x4(raw, b_base + (16 * pair + b_src.row) * b_pitch + b_src.byte);
      split(raw, b_big, b_small);
#pragma unroll
      for (int mi = 0; mi < M_TILES; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float (&c)[4] = acc[mi][2 * pair + half];
          if constexpr (kSplit3) {
            mma::mma_1688_tf32(c, a_small[mi], b_big[2 * half], b_big[2 * half + 1]);
            mma::mma_1688_tf32(c, a_big[mi], b_small[2 * half], b_small[2 * half + 1]);
          }
          mma::mma_1688_tf32(c, a_big[mi], b_big[2 * half], b_big[2 * half + 1]);
        }
      }
    }
  }
};

// Exact fp32 on the SIMT units, computing the same accumulator elements a lane would hold after
// an MMA (csrc/mma_layout.h), so the epilogue is shared. Sums run over k in increasing order.
struct SimtFp32 {
  static constexpr bool kTensorCores = false;

  template <int M_TILES>
  __device__ __forceinline__ static void slab(uint32_t a_base, int a_pitch, uint32_t b_base, int b_pitch, int lane,
                                              float (&acc)[M_TILES][kNTiles][4]) {
    const int group = lane >> 2;       // rows group, group + 8
    const int pair = 2 * (lane & 3);   // codes pair, pair + 1
#pragma unroll
    for (int quarter = 0; quarter < 2; ++quarter) {  // 4 fp32 values of k per quarter
      float4 a[M_TILES][2];
#pragma unroll
      for (int mi = 0; mi < M_TILES; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t address = a_base + (16 * mi + group + 8 * h) * a_pitch + 16 * quarter;
          asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                       : "=f"(a[mi][h].x), "=f"(a[mi][h].y), "=f"(a[mi][h].z), "=f"(a[mi][h].w)
                       : "r"(address)
                       : "memory");
        }
      }
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
        float4 b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t address = b_base + (8 * ni + pair + h) * b_pitch + 16 * quarter;
          asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                       : "=f"(b[h].x), "=f"(b[h].y), "=f"(b[h].z), "=f"(b[h].w)
                       : "r"(address)
                       : "memory");
        }
#pragma unroll
        for (int mi = 0; mi < M_TILES; ++mi) {
#pragma unroll
          for (int reg = 0; reg < 4; ++reg) {
            const float4& x = a[mi][reg >> 1];
            const float4& e = b[reg & 1];
            float s = acc[mi][ni][reg];
            s = fmaf(x.x, e.x, s);
            s = fmaf(x.y, e.y, s);
            s = fmaf(x.z, e.z, s);
            s = fmaf(x.w, e.w, s);
            acc[mi][ni][reg] = s;
          }
        }
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------
// The kernel
// ----------------------------------------------------------------------------------------------

struct KernelArgs {
  const uint8_t* queries;
  const uint8_t* codes;
  const float* code_term;
  const float* row_squared_norm;
  float* distances;
  void* indices;
  int64_t n_rows;
  int32_t n_codes;
  int32_t dim_bytes;  // multiple of 16
  int32_t k_out;
  bool int64_indices;
  bool cosine;
  bool resident;  // query tile kept in shared memory for the whole codebook
  rank::NanRank nan_rank;
};

// Copy `rows` rows of one 64-byte chunk (or `vectors_per_row` 16-byte vectors of every row) into
// shared memory; rows at or beyond `row_limit` and bytes at or beyond dim_bytes are zero-filled.
__device__ __forceinline__ void load_rows(uint32_t destination, int pitch, const uint8_t* source, int64_t first_row,
                                          int rows, int64_t row_limit, int32_t dim_bytes, int32_t first_byte,
                                          int vectors_per_row, int thread) {
  const int vectors = rows * vectors_per_row;
  for (int v = thread; v < vectors; v += kThreads) {
    const int r = v / vectors_per_row;
    const int byte = 16 * (v - r * vectors_per_row);
    const int64_t row = first_row + r;
    const bool valid = row < row_limit && first_byte + byte < dim_bytes;
    const uint8_t* from = valid ? source + row * dim_bytes + first_byte + byte : source;
    mma::cp_async_16(destination + r * pitch + byte, from, valid);
  }
}

template <int M_TILES>
__device__ __forceinline__ void zero_accumulators(float (&acc)[M_TILES][kNTiles][4]) {
#pragma unroll
  for (int mi = 0; mi < M_TILES; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
}

template <class Math, int KP>
__global__ void __launch_bounds__(kThreads, 1) rank_codes_kernel(const KernelArgs args) {
  constexpr int kMTiles = m_tiles_for(KP);
  constexpr int kRows = block_rows_for(KP);
  constexpr int kWarpRows = 16 * kMTiles;
  constexpr int kSlots = 2 * kMTiles;
  static_assert(kRows * KP * sizeof(rank::Key) <= static_cast<size_t>(kStages) * kCodes * kStagePitch,
                "the cross-warp merge reuses the ring");

  extern __shared__ __align__(16) uint8_t shared[];
  const int thread = threadIdx.x;
  const int lane = thread & 31;
  const int warp = thread >> 5;
  const int warp_m = warp % kWarpsM;
  const int warp_n = warp / kWarpsM;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  const int32_t chunks = static_cast<int32_t>(chunks_for(args.dim_bytes));
  const int32_t tiles = (args.n_codes + kCodes - 1) / kCodes;
  const int64_t total_steps = static_cast<int64_t>(tiles) * chunks;
  const int q_pitch = args.resident ? static_cast<int>(resident_pitch(args.dim_bytes)) : kStagePitch;
  const uint32_t query_region = mma::shared_address(shared);
  const uint32_t ring = query_region + (args.resident ? kRows * q_pitch : 0);
  const int stage_bytes = (kCodes + (args.resident ? 0 : kRows)) * kStagePitch;

  // Ring stage s holds a code chunk (kCodes rows), then in streaming mode the query chunk (kRows
  // rows). Steps are issued in order; counters instead of divisions track (tile, chunk, stage).
  int64_t issued = 0;
  int32_t issue_tile = 0, issue_chunk = 0, issue_stage = 0;
  const auto issue_next_step = [&]() {
    if (issued < total_steps) {
      const uint32_t stage = ring + issue_stage * stage_bytes;
      load_rows(stage, kStagePitch, args.codes, static_cast<int64_t>(issue_tile) * kCodes, kCodes, args.n_codes,
                args.dim_bytes, issue_chunk * kChunkBytes, kChunkBytes / 16, thread);
      if (!args.resident) {
        load_rows(stage + kCodes * kStagePitch, kStagePitch, args.queries, row0, kRows, args.n_rows, args.dim_bytes,
                  issue_chunk * kChunkBytes, kChunkBytes / 16, thread);
      }
      ++issued;
      if (++issue_chunk == chunks) {
        issue_chunk = 0;
        ++issue_tile;
      }
      if (++issue_stage == kStages) issue_stage = 0;
    }
    mma::cp_async_commit();  // possibly empty: keeps one group per step for cp_async_wait
  };

  if (args.resident) {
    load_rows(query_region, q_pitch, args.queries, row0, kRows, args.n_rows, args.dim_bytes, 0, chunks * kChunkBytes / 16,
              thread);
    mma::cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue_next_step();

  rank::Key lists[kSlots][KP];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) rank::clear_list<KP>(lists[s]);
  float acc[kMTiles][kNTiles][4];
  zero_accumulators(acc);

  const auto term_at = [&](int64_t code) { return __ldg(args.code_term + code); };
  int32_t tile = 0, chunk = 0, read_stage = 0;
  for (int64_t step = 0; step < total_steps; ++step) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();  // this step's chunk is visible to all; everyone is done with step - 1's stage
    issue_next_step();  // step + kStages - 1, into the stage step - 1 used

    const uint32_t stage = ring + read_stage * stage_bytes;
    if (++read_stage == kStages) read_stage = 0;
    const uint32_t b_base = stage + warp_n * kWarpCodes * kStagePitch;
    const uint32_t a_base = args.resident ? query_region + warp_m * kWarpRows * q_pitch + chunk * kChunkBytes
                                          : stage + (kCodes + warp_m * kWarpRows) * kStagePitch;
#pragma unroll
    for (int slab = 0; slab < kChunkBytes / mma::kSlabBytes; ++slab) {
      Math::template slab<kMTiles>(a_base + slab * mma::kSlabBytes, q_pitch, b_base + slab * mma::kSlabBytes,
                                   kStagePitch, lane, acc);
    }

    if (++chunk == chunks) {
      rank::insert_tile_scores<KP, kMTiles, kNTiles>(lane, acc,
                                                      static_cast<int64_t>(tile) * kCodes + warp_n * kWarpCodes,
                                                      args.n_codes, term_at, args.cosine, args.nan_rank, lists);
      zero_accumulators(acc);
      chunk = 0;
      ++tile;
    }
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // the ring is free: reuse it for the cross-warp merge

  // The four lanes of a quad hold disjoint codes of the same rows: butterfly-merge their lists.
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
      rank::Key other[KP];
#pragma unroll
      for (int j = 0; j < KP; ++j) other[j] = __shfl_xor_sync(0xffffffffu, lists[s][j], offset);
      rank::merge_lists<KP>(lists[s], other);
    }
  }

  rank::Key* exchange = reinterpret_cast<rank::Key*>(shared + (ring - query_region));
  const bool quad_leader = (lane & 3) == 0;
  if (warp_n == 1 && quad_leader) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int local_row = warp_m * kWarpRows + rank::list_row(lane, s);
#pragma unroll
      for (int j = 0; j < KP; ++j) exchange[local_row * KP + j] = lists[s][j];
    }
  }
  __syncthreads();
  if (warp_n != 0 || !quad_leader) return;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int local_row = warp_m * kWarpRows + rank::list_row(lane, s);
    rank::Key other[KP];
#pragma unroll
    for (int j = 0; j < KP; ++j) other[j] = exchange[local_row * KP + j];
    rank::merge_lists<KP>(lists[s], other);
    const int64_t row = row0 + local_row;
    if (row >= args.n_rows) continue;
    const float squared_norm = args.distances != nullptr ? args.row_squared_norm[row] : 0.0f;
#pragma unroll
    for (int j = 0; j < KP; ++j) {
      if (j >= args.k_out) break;
      const int64_t out = row * args.k_out + j;
      int64_t index = rank::key_index(lists[s][j]);
      if (args.distances != nullptr) {
        const float distance = rank::reported_distance(rank::key_score(lists[s][j]), squared_norm, args.cosine);
        args.distances[out] = distance;
        if (distance != distance) index = -1;
      }
      if (args.int64_indices) {
        static_cast<int64_t*>(args.indices)[out] = index;
      } else {
        static_cast<int32_t*>(args.indices)[out] = static_cast<int32_t>(index);
      }
    }
  }
}

}  // namespace ranking
}  // namespace pacofr
