// Index arithmetic of the patch kernels (csrc/patches.cu), host-testable: a patch row's top-left
// pixel and a value's offset inside its patch, in 32-bit index math with FastDivmod and 64-bit
// element offsets (multiplications only). Conventions as in pacofr/ops/patches.py: images
// (B, C, H, W) with any strides; ids (B, n) row-major patch indices; value k of a patch is
// ((py * p + px) * C + c).
#pragma once

#include <cstdint>

#include "fast_divmod.h"
#include "host_device.h"

namespace pacofr {
namespace patches {

struct PatchIndexer {
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;
  uint32_t num_patches = 0;  // L = (H / p) * (W / p)
  uint32_t patch = 1;        // p
  uint32_t patch_dim = 0;    // P = p * p * C
  FastDivmod channels;       // C
  FastDivmod patch_side;     // p
  FastDivmod grid_cols;      // W / p
  FastDivmod rows_per_image; // n

  // Element offset of value k (< P) of a patch, relative to the patch's top-left pixel.
  PACOFR_HD int64_t value_offset(uint32_t k) const {
    const uint32_t pixel = channels.div(k);
    const uint32_t c = channels.mod(k, pixel);
    const uint32_t py = patch_side.div(pixel);
    const uint32_t px = patch_side.mod(pixel, py);
    return c * stride_c + py * stride_h + px * stride_w;
  }

  // Channel of value k of a patch.
  PACOFR_HD uint32_t value_channel(uint32_t k) const { return channels.mod(k, channels.div(k)); }

  // Offset of the top-left pixel of patch `patch_id` of flat row `row` (= b * n + j); false when
  // patch_id is outside [0, L).
  PACOFR_HD bool patch_base(int64_t patch_id, uint32_t row, int64_t* base) const {
    if (patch_id < 0 || patch_id >= static_cast<int64_t>(num_patches)) return false;
    const uint32_t id = static_cast<uint32_t>(patch_id);
    const uint32_t image = rows_per_image.div(row);
    const uint32_t patch_row = grid_cols.div(id);
    const uint32_t patch_col = grid_cols.mod(id, patch_row);
    *base = image * stride_b + static_cast<int64_t>(patch_row * patch) * stride_h +
            static_cast<int64_t>(patch_col * patch) * stride_w;
    return true;
  }
};

// Threads and blocks of a kernel over (rows, values per row): block (threads_x, threads_y) covers
// threads_y rows x threads_x values, so a thread finds its row and value from block and thread
// indices alone (no division). threads_x is `values` rounded up to a warp multiple, at most 256.
struct RowTiling {
  int threads_x;
  int threads_y;
  int64_t blocks_x;  // over rows
  int64_t blocks_y;  // over values
};

PACOFR_HD RowTiling tile_rows_by_values(int64_t rows, int64_t values) {
  constexpr int kBlockThreads = 256;
  const int64_t warp_multiple = (values + 31) / 32 * 32;
  const int threads_x = warp_multiple < kBlockThreads ? static_cast<int>(warp_multiple < 32 ? 32 : warp_multiple)
                                                      : kBlockThreads;
  const int threads_y = kBlockThreads / threads_x;
  return {threads_x, threads_y, (rows + threads_y - 1) / threads_y, (values + threads_x - 1) / threads_x};
}

}  // namespace patches
}  // namespace pacofr
