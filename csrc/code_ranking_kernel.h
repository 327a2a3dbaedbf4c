// The tensor-core score loop with its top-k epilogue, shared by nearest_token and the soft_assign
// ranking (instantiated in csrc/code_ranking.cu). Shapes and shared-memory layout:
// csrc/ranking_tiles.h; fragment layouts: csrc/mma_layout.h; keys and lists: csrc/rank_keys.h;
// scores: csrc/ranking_epilogue.h.
//
// Per block: the query tile (kRows rows) and a kStages-deep cp.async ring of 64-byte code chunks
// (each stage with room for a tile's code terms, loaded with the tile's last chunk);
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
  const float* code_term;  // 16-byte aligned
  const float* row_squared_norm;
  float* distances;
  void* indices;
  int64_t n_rows;
  int32_t n_codes;
  int32_t dim_bytes;  // multiple of 16
  int32_t k_out;
  bool int64_indices;
  bool cosine;
  rank::NanRank nan_rank;
};

// Position of a step in the flat (code tile, D chunk) sequence the kernels walk, and its stage in a
// ring of kRingStages.
template <int kRingStages>
struct RingCursor {
  int32_t tile = 0, chunk = 0, stage = 0;

  __device__ __forceinline__ void advance(int32_t chunks) {
    if (++chunk == chunks) {
      chunk = 0;
      ++tile;
    }
    if (++stage == kRingStages) stage = 0;
  }
};

// Copy `rows` rows of `vectors_per_row` 16-byte vectors each (from byte first_byte of every row)
// into shared memory; rows at or beyond `row_limit` and bytes at or beyond dim_bytes are zero-filled.
// Compile-time sizes (the ring stages) unroll; the resident query tile passes runtime ones.
__device__ __forceinline__ void load_vector(uint32_t destination, int pitch, const uint8_t* source, int64_t first_row,
                                            int vector, int vectors_per_row, int64_t row_limit, int32_t dim_bytes,
                                            int32_t first_byte) {
  const int r = vector / vectors_per_row;
  const int byte = 16 * (vector - r * vectors_per_row);
  const int64_t row = first_row + r;
  const bool valid = row < row_limit && first_byte + byte < dim_bytes;
  const uint8_t* from = valid ? source + row * dim_bytes + first_byte + byte : source;
  mma::cp_async_16(destination + r * pitch + byte, from, valid);
}

template <int kRowsLoaded>
__device__ __forceinline__ void load_chunk(uint32_t destination, const uint8_t* source, int64_t first_row,
                                           int64_t row_limit, int32_t dim_bytes, int32_t first_byte, int thread) {
  constexpr int kVectorsPerRow = kChunkBytes / 16;
  constexpr int kVectors = kRowsLoaded * kVectorsPerRow;
#pragma unroll
  for (int i = 0; i < (kVectors + kThreads - 1) / kThreads; ++i) {
    const int v = thread + i * kThreads;
    if (kVectors % kThreads == 0 || v < kVectors) {
      load_vector(destination, kStagePitch, source, first_row, v, kVectorsPerRow, row_limit, dim_bytes, first_byte);
    }
  }
}

// The kCodes code terms of tile `tile` (zeros past n_codes) into `destination`, 16 bytes per thread.
__device__ __forceinline__ void load_terms(uint32_t destination, const float* code_term, int32_t tile,
                                           int32_t n_codes, int thread) {
  if (thread < kTermBytes / 16) {
    const int64_t first = static_cast<int64_t>(tile) * kCodes + 4 * thread;
    const int64_t left = n_codes - first;
    const int bytes = left >= 4 ? 16 : (left > 0 ? static_cast<int>(4 * left) : 0);
    mma::cp_async_prefix(destination + 16 * thread, bytes > 0 ? code_term + first : code_term, bytes);
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

// The four lanes of a quad hold disjoint codes of the same rows: butterfly-merge their lists.
template <int KP, int kSlots>
__device__ __forceinline__ void quad_merge(rank::Key (&lists)[kSlots][KP]) {
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
}

// Write row `row`'s k_out results from its merged list (nothing for a padding row).
template <int KP>
__device__ __forceinline__ void store_row(const KernelArgs& args, int64_t row, const rank::Key (&list)[KP]) {
  if (row >= args.n_rows) return;
  const float squared_norm = args.distances != nullptr ? args.row_squared_norm[row] : 0.0f;
#pragma unroll
  for (int j = 0; j < KP; ++j) {
    if (j >= args.k_out) break;
    const int64_t out = row * args.k_out + j;
    int64_t index = rank::key_index(list[j]);
    if (args.distances != nullptr) {
      const float distance = rank::reported_distance(rank::key_score(list[j]), squared_norm, args.cosine);
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

// kResident: the query tile stays in shared memory for the whole codebook; else every ring stage
// carries the query chunk too.
template <class Math, int KP, bool kResident>
__global__ void __launch_bounds__(kThreads, 1) rank_codes_kernel(const KernelArgs args) {
  constexpr int kMTiles = m_tiles_for(KP);
  constexpr int kRows = block_rows_for(KP);
  constexpr int kWarpRows = 16 * kMTiles;
  constexpr int kSlots = 2 * kMTiles;
  constexpr int kStageBytes = static_cast<int>(stage_bytes(kRows, kResident));
  constexpr int kTermOffset = kStageBytes - kTermBytes;
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
  const int q_pitch = kResident ? static_cast<int>(resident_pitch(args.dim_bytes)) : kStagePitch;
  const uint32_t query_region = mma::shared_address(shared);
  const uint32_t ring = query_region + (kResident ? kRows * q_pitch : 0);

  // Ring stage s holds a code chunk (kCodes rows), in streaming mode the query chunk (kRows rows),
  // and after a tile's last chunk the tile's code terms. Steps are issued in order; counters instead
  // of divisions track (tile, chunk, stage).
  int64_t issued = 0;
  RingCursor<kStages> issue;
  const auto issue_next_step = [&]() {
    if (issued < total_steps) {
      const uint32_t stage = ring + issue.stage * kStageBytes;
      load_chunk<kCodes>(stage, args.codes, static_cast<int64_t>(issue.tile) * kCodes, args.n_codes, args.dim_bytes,
                         issue.chunk * kChunkBytes, thread);
      if constexpr (!kResident) {
        load_chunk<kRows>(stage + kCodes * kStagePitch, args.queries, row0, args.n_rows, args.dim_bytes,
                          issue.chunk * kChunkBytes, thread);
      }
      if (issue.chunk == chunks - 1) load_terms(stage + kTermOffset, args.code_term, issue.tile, args.n_codes, thread);
      ++issued;
      issue.advance(chunks);
    }
    mma::cp_async_commit();  // possibly empty: keeps one group per step for cp_async_wait
  };

  if constexpr (kResident) {
    const int vectors_per_row = chunks * kChunkBytes / 16;
    for (int v = thread; v < kRows * vectors_per_row; v += kThreads) {
      load_vector(query_region, q_pitch, args.queries, row0, v, vectors_per_row, args.n_rows, args.dim_bytes, 0);
    }
    mma::cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue_next_step();

  rank::Key lists[kSlots][KP];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) rank::clear_list<KP>(lists[s]);
  float acc[kMTiles][kNTiles][4];
  zero_accumulators(acc);

  RingCursor<kStages> read;
  for (int64_t step = 0; step < total_steps; ++step) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();  // this step's chunk is visible to all; everyone is done with step - 1's stage
    issue_next_step();  // step + kStages - 1, into the stage step - 1 used

    const RingCursor<kStages> at = read;
    read.advance(chunks);
    const int stage_offset = static_cast<int>(ring - query_region) + at.stage * kStageBytes;
    const uint32_t stage = query_region + stage_offset;
    const uint32_t b_base = stage + warp_n * kWarpCodes * kStagePitch;
    const uint32_t a_base = kResident ? query_region + warp_m * kWarpRows * q_pitch + at.chunk * kChunkBytes
                                      : stage + (kCodes + warp_m * kWarpRows) * kStagePitch;
#pragma unroll
    for (int slab = 0; slab < kChunkBytes / mma::kSlabBytes; ++slab) {
      Math::template slab<kMTiles>(a_base + slab * mma::kSlabBytes, q_pitch, b_base + slab * mma::kSlabBytes,
                                   kStagePitch, lane, acc);
    }

    if (at.chunk == chunks - 1) {  // the stage also holds this tile's code terms (loaded with its last chunk)
      const float* terms = reinterpret_cast<const float*>(shared + stage_offset + kTermOffset);
      const int64_t tile_first = static_cast<int64_t>(at.tile) * kCodes;
      const auto term_at = [&](int64_t code) { return terms[code - tile_first]; };
      rank::insert_tile_scores<KP, kMTiles, kNTiles>(lane, acc, tile_first + warp_n * kWarpCodes, args.n_codes,
                                                      term_at, args.cosine, args.nan_rank, lists);
      zero_accumulators(acc);
    }
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // the ring is free: reuse it for the cross-warp merge

  quad_merge<KP, kSlots>(lists);

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
    store_row(args, row0 + local_row, lists[s]);
  }
}

}  // namespace ranking
}  // namespace pacofr
