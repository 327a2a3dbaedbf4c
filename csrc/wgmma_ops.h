// Thin device wrappers over the sm_90a warpgroup tensor-core instructions of the Hopper code
// ranking (csrc/code_ranking_sm90.h): shared-memory matrix descriptors, wgmma.mma_async
// m64n128k16 with fp32 accumulators and both operands in shared memory, and the fences around it.
// Outside an sm_90a compilation (__CUDA_ARCH_FEAT_SM90_ALL undefined) every wrapper traps; the
// launcher never selects the kernel there.
//
// Shared-memory layout both operands use ("K-major, no swizzle" in the PTX ISA's terms): core
// matrices of 8 rows x 16 bytes stored as 128 contiguous bytes (row r of the core matrix at byte
// 16 r); the core matrix of row group g and 16-byte column c of the D chunk lies at
// (g * kColumns + c) * 128, so neighbours along K (the leading dimension) are 128 bytes apart and
// neighbours along M or N (the stride dimension) kColumns * 128 bytes apart.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace pacofr {
namespace wgmma {

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PACOFR_NEEDS_SM90A() __trap()
#else
#define PACOFR_NEEDS_SM90A() ((void)0)
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PACOFR_HAS_WGMMA 1
#else
#define PACOFR_HAS_WGMMA 0
#endif

constexpr int kCoreRows = 8;
constexpr int kCoreBytes = 128;  // 8 rows x 16 bytes
constexpr int kM = 64;           // rows of one warpgroup MMA
constexpr int kN = 128;          // codes of one warpgroup MMA
constexpr int kKBytes = 32;      // bytes of K per MMA (16 16-bit values)
constexpr int kAccumulators = kM * kN / 128;  // fp32 per thread: 64

// Byte offset of the 16-byte vector (row, column) in the layout above, for `columns` 16-byte
// columns per row group.
PACOFR_HD uint32_t core_offset(int row, int column, int columns) {
  return static_cast<uint32_t>(((row / kCoreRows) * columns + column) * kCoreBytes + (row % kCoreRows) * 16);
}

// The 64-bit matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading and
// stride dimension byte offsets (all >> 4, 14 bits each), no swizzle, base offset 0.
PACOFR_HD uint64_t descriptor(uint32_t shared_address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((shared_address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32);
}

#if defined(__CUDACC__)
// Make the cp.async writes this thread saw complete visible to the async proxy that wgmma reads
// shared memory through (then a barrier makes every thread's writes visible).
__device__ __forceinline__ void fence_async_shared() {
#if PACOFR_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  PACOFR_NEEDS_SM90A();
#endif
}

// Order the accumulator registers' earlier uses before the warpgroup MMAs that follow.
__device__ __forceinline__ void fence() {
#if PACOFR_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  PACOFR_NEEDS_SM90A();
#endif
}

__device__ __forceinline__ void commit_group() {
#if PACOFR_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  PACOFR_NEEDS_SM90A();
#endif
}

// Wait until no committed group of this warpgroup is pending; the accumulators are then final.
__device__ __forceinline__ void wait_all(float (&d)[kAccumulators]) {
#if PACOFR_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) asm volatile("" : "+f"(d[i])::"memory");  // no reads hoisted above
#else
  PACOFR_NEEDS_SM90A();
#endif
}

// d (64 x 128 fp32 of the warpgroup) = A (64 x 16, K-major) * B (128 x 16, K-major)^T + (accumulate ? d : 0).
template <bool kBFloat16>
__device__ __forceinline__ void mma_64x128x16(float (&d)[kAccumulators], uint64_t a, uint64_t b, bool accumulate) {
#if PACOFR_HAS_WGMMA
  const int scale_d = accumulate ? 1 : 0;
  if constexpr (kBFloat16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
  }
#else
  PACOFR_NEEDS_SM90A();
#endif
}

#endif  // __CUDACC__

}  // namespace wgmma
}  // namespace pacofr
