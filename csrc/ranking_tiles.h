// Tile shapes and shared-memory layout of the code-ranking kernel (csrc/code_ranking_kernel.h),
// host-testable arithmetic shared by the kernel and its launcher.
//
// A block of 8 warps (4 along rows x 2 along codes) owns kRows query rows and walks the codebook
// in tiles of kCodes = 128 codes. A warp computes M_TILES x 16 rows by 64 codes (8 MMA n-tiles);
// M_TILES is 2 for k <= 4 and 1 above (the top-k lists live in registers: 2 * M_TILES rows of KP
// keys per lane). D is consumed in chunks of 64 bytes (two 32-byte MMA k-slabs) through a
// kStages-deep cp.async ring of code chunks. The query tile stays in shared memory for the whole
// codebook ("resident") when it fits next to the ring; otherwise each ring stage also carries the
// query chunk ("streaming", every code tile re-reads the query tile from L2).
// Row pitches are 16 bytes more than a multiple of 64 so that ldmatrix's eight 16-byte row reads
// fall in distinct banks. Every ring stage also has room for the kCodes fp32 code terms of a tile:
// the step that loads a tile's last D chunk loads its terms too, so the epilogue that follows reads
// them from shared memory instead of making dependent global loads.
#pragma once

#include <cstddef>
#include <cstdint>

#include "host_device.h"

namespace pacofr {
namespace ranking {

constexpr int kWarpsM = 4;
constexpr int kWarpsN = 2;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kNTiles = 8;                     // n8 MMA tiles per warp
constexpr int kWarpCodes = 8 * kNTiles;        // 64
constexpr int kCodes = kWarpsN * kWarpCodes;   // 128 codes per block tile
constexpr int kChunkBytes = 64;                // D bytes per ring stage
constexpr int kStagePitch = kChunkBytes + 16;  // bytes per row in a ring stage
constexpr int kTermBytes = 4 * kCodes;         // fp32 code terms of one tile per ring stage
constexpr int kStages = 3;  // 4 would push the bf16 D = 768 query tile out of sm_90's 227 KiB

PACOFR_HD constexpr int m_tiles_for(int kp) { return kp <= 4 ? 2 : 1; }
PACOFR_HD constexpr int block_rows_for(int kp) { return kWarpsM * 16 * m_tiles_for(kp); }

PACOFR_HD int64_t chunks_for(int64_t dim_bytes) { return (dim_bytes + kChunkBytes - 1) / kChunkBytes; }

// Row pitch of the resident query tile.
PACOFR_HD int64_t resident_pitch(int64_t dim_bytes) { return chunks_for(dim_bytes) * kChunkBytes + 16; }

// Bytes of one ring stage: the code chunk, the query chunk when streaming, the tile's code terms.
PACOFR_HD constexpr int64_t stage_bytes(int rows, bool resident) {
  return static_cast<int64_t>(kCodes + (resident ? 0 : rows)) * kStagePitch + kTermBytes;
}

PACOFR_HD int64_t resident_shared_bytes(int rows, int64_t dim_bytes) {
  return rows * resident_pitch(dim_bytes) + kStages * stage_bytes(rows, true);
}

PACOFR_HD int64_t streaming_shared_bytes(int rows) { return kStages * stage_bytes(rows, false); }

// The Hopper kernel (csrc/code_ranking_sm90.h): 128 resident query rows (two warpgroups of 64) in
// wgmma core-matrix layout (no padding), and kWgmmaStages ring stages of a kCodes x 128-byte code
// chunk with the tile's code terms. A 128-byte step carries four k16 MMAs per warpgroup for one
// barrier, fence and commit/wait (64-byte steps had two); two stages keep the same prefetch distance
// as three 64-byte ones (128 bytes of D ahead) in shared memory that still fits two blocks per SM at
// bf16 D = 256 (97 KiB each; three 128-byte stages would need 114.5 KiB, and two such blocks plus
// their reserved 1 KiB each exceed the SM's 228 KiB) and one block at D = 768 (225 KiB).
constexpr int kWgmmaRows = 128;
constexpr int kWgmmaChunkBytes = 128;
constexpr int kWgmmaStages = 2;

PACOFR_HD int64_t wgmma_chunks_for(int64_t dim_bytes) { return (dim_bytes + kWgmmaChunkBytes - 1) / kWgmmaChunkBytes; }

PACOFR_HD constexpr int64_t wgmma_stage_bytes() {
  return static_cast<int64_t>(kCodes) * kWgmmaChunkBytes + kTermBytes;
}

PACOFR_HD int64_t wgmma_shared_bytes(int64_t dim_bytes) {
  return kWgmmaRows * wgmma_chunks_for(dim_bytes) * kWgmmaChunkBytes + kWgmmaStages * wgmma_stage_bytes();
}

}  // namespace ranking
}  // namespace pacofr
