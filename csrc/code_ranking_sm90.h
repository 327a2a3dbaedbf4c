// The Hopper (sm_90a) code ranking for fp16 / bf16 inputs: the score loop of
// csrc/code_ranking_kernel.h on warpgroup MMAs (wgmma.mma_async, csrc/wgmma_ops.h) instead of
// mma.sync, with the same keys, epilogue, merges and output contract (csrc/rank_keys.h,
// csrc/ranking_epilogue.h). NOT YET RUN ON A GPU: the launcher does not select it (see
// csrc/code_ranking.cu); it is compiled so that its SASS (HGMMA) and resources can be checked.
//
// Per block: two warpgroups (8 warps, kThreads threads), each owning 64 of the block's 128 query
// rows; the query tile stays in shared memory for the whole codebook (resident only: the launcher
// would fall back to the mma.sync kernel when it does not fit), laid out in wgmma core matrices;
// code tiles of kCodes = 128 codes stream through the kWgmmaStages-deep cp.async ring of 128-byte D
// chunks (each stage with the tile's code terms, loaded with its last chunk; csrc/ranking_tiles.h
// says why 128 bytes and two stages). Per step each warpgroup issues four m64n128k16 MMAs (one per
// 32-byte k-slab), commits and waits; after a tile's
// last chunk each lane feeds its accumulators, which have mma.sync's m16n8 layout per 8-code
// column block (16 rows per warp), to the shared epilogue as one 16-row m-tile of 16 n8 tiles.
// Each warp owns whole rows, so only the quad butterfly merge remains before the store.
#pragma once

#include "code_ranking_kernel.h"
#include "wgmma_ops.h"

namespace pacofr {
namespace ranking {

constexpr int kWgmmaNTiles = wgmma::kN / 8;  // n8 column blocks of one warpgroup accumulator
static_assert(kWgmmaRows == 2 * wgmma::kM, "two warpgroups of query rows per block");
static_assert(wgmma::kN == kCodes, "one warpgroup MMA spans the code tile");
static_assert(kThreads == 2 * 128, "two warpgroups per block");
static_assert(kCodes * (kWgmmaChunkBytes / 16) % kThreads == 0, "every thread loads as many code vectors per step");

template <bool kBFloat16, int KP>
__global__ void __launch_bounds__(kThreads, 1) rank_codes_wgmma_kernel(const KernelArgs args) {
  constexpr int kSlots = 2;  // rows l/4 and l/4 + 8 of the warp's 16
  constexpr int kChunkColumns = kWgmmaChunkBytes / 16;
  constexpr int kStageBytes = static_cast<int>(wgmma_stage_bytes());
  constexpr int kTermOffset = kCodes * kWgmmaChunkBytes;

  extern __shared__ __align__(16) uint8_t shared[];  // wgmma without swizzle needs 16 bytes
  const int thread = threadIdx.x;
  const int lane = thread & 31;
  const int warp = thread >> 5;
  const int warpgroup = warp >> 2;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kWgmmaRows;

  const int32_t chunks = static_cast<int32_t>(wgmma_chunks_for(args.dim_bytes));
  const int32_t tiles = (args.n_codes + kCodes - 1) / kCodes;
  const int64_t total_steps = static_cast<int64_t>(tiles) * chunks;
  const int query_columns = chunks * kChunkColumns;  // 16-byte columns of the resident query tile
  const uint32_t query_region = mma::shared_address(shared);
  const int ring_offset = kWgmmaRows * query_columns * 16;

  // The query tile, 16-byte vector (row, column) at core_offset(row, column, query_columns).
  for (int v = thread; v < kWgmmaRows * query_columns; v += kThreads) {
    const int r = v / query_columns, column = v - r * query_columns;
    const int64_t row = row0 + r;
    const bool valid = row < args.n_rows && 16 * column < args.dim_bytes;
    const uint8_t* from = valid ? args.queries + row * args.dim_bytes + 16 * column : args.queries;
    mma::cp_async_16(query_region + wgmma::core_offset(r, column, query_columns), from, valid);
  }
  mma::cp_async_commit();

  int64_t issued = 0;
  RingCursor<kWgmmaStages> issue;
  const auto issue_next_step = [&]() {
    if (issued < total_steps) {
      const uint32_t stage = query_region + ring_offset + issue.stage * kStageBytes;
      const int64_t first_code = static_cast<int64_t>(issue.tile) * kCodes;
#pragma unroll
      for (int i = 0; i < kCodes * kChunkColumns / kThreads; ++i) {
        const int v = thread + i * kThreads;
        const int c = v / kChunkColumns, column = v % kChunkColumns;
        const int byte = issue.chunk * kWgmmaChunkBytes + 16 * column;
        const bool valid = first_code + c < args.n_codes && byte < args.dim_bytes;
        const uint8_t* from = valid ? args.codes + (first_code + c) * args.dim_bytes + byte : args.codes;
        mma::cp_async_16(stage + wgmma::core_offset(c, column, kChunkColumns), from, valid);
      }
      if (issue.chunk == chunks - 1) load_terms(stage + kTermOffset, args.code_term, issue.tile, args.n_codes, thread);
      ++issued;
      issue.advance(chunks);
    }
    mma::cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kWgmmaStages - 1; ++s) issue_next_step();

  rank::Key lists[kSlots][KP];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) rank::clear_list<KP>(lists[s]);
  float d[wgmma::kAccumulators];
  float (&acc)[1][kWgmmaNTiles][4] = *reinterpret_cast<float (*)[1][kWgmmaNTiles][4]>(d);

  const uint32_t query_stride = static_cast<uint32_t>(query_columns) * wgmma::kCoreBytes;
  const uint32_t query_base = query_region + wgmma::core_offset(warpgroup * wgmma::kM, 0, query_columns);
  RingCursor<kWgmmaStages> read;
  for (int64_t step = 0; step < total_steps; ++step) {
    mma::cp_async_wait<kWgmmaStages - 2>();
    wgmma::fence_async_shared();
    __syncthreads();  // this step's chunk is visible to all; everyone is done with step - 1's stage
    issue_next_step();

    const RingCursor<kWgmmaStages> at = read;
    read.advance(chunks);
    const int stage_offset = ring_offset + at.stage * kStageBytes;
    wgmma::fence();
#pragma unroll
    for (int slab = 0; slab < kWgmmaChunkBytes / wgmma::kKBytes; ++slab) {
      const int column = 2 * slab;  // two 16-byte core-matrix columns per k-slab
      const uint64_t a = wgmma::descriptor(query_base + (at.chunk * kChunkColumns + column) * wgmma::kCoreBytes,
                                           wgmma::kCoreBytes, query_stride);
      const uint64_t b = wgmma::descriptor(query_region + stage_offset + column * wgmma::kCoreBytes,
                                           wgmma::kCoreBytes, kChunkColumns * wgmma::kCoreBytes);
      wgmma::mma_64x128x16<kBFloat16>(d, a, b, at.chunk > 0 || slab > 0);
    }
    wgmma::commit_group();
    wgmma::wait_all(d);

    if (at.chunk == chunks - 1) {  // the stage also holds this tile's code terms
      const float* terms = reinterpret_cast<const float*>(shared + stage_offset + kTermOffset);
      const int64_t tile_first = static_cast<int64_t>(at.tile) * kCodes;
      const auto term_at = [&](int64_t code) { return terms[code - tile_first]; };
      rank::insert_tile_scores<KP, 1, kWgmmaNTiles>(lane, acc, tile_first, args.n_codes, term_at, args.cosine,
                                                     args.nan_rank, lists);
    }
  }
  mma::cp_async_wait<0>();

  quad_merge<KP, kSlots>(lists);
  if ((lane & 3) != 0) return;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) store_row(args, row0 + 16 * warp + rank::list_row(lane, s), lists[s]);
}

}  // namespace ranking
}  // namespace pacofr
