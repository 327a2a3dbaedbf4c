// Thin device wrappers over the PTX instructions of the tensor-core score loop (sm_80 and newer):
// cp.async (16-byte global -> shared copies, zero-filled when out of range), ldmatrix.x4,
// mma.sync m16n8k16 (fp16 / bf16 in, fp32 accumulate), mma.sync m16n8k8 (tf32 in, fp32 accumulate)
// and the round-to-nearest fp32 -> tf32 conversion. Which lane holds what: csrc/mma_layout.h.
// Below sm_80 every wrapper traps; the launcher refuses such devices before launching.
#pragma once

#include <cstdint>

namespace pacofr {
namespace mma {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PACOFR_NEEDS_SM80() __trap()
#else
#define PACOFR_NEEDS_SM80() ((void)0)
#endif

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copy 16 bytes from `source` to shared `destination`, or write 16 zero bytes when !valid (the
// source is then not read, but must still be a mapped address).
// Copy the first `bytes` (0..16) of the 16 bytes at `source` to shared `destination` and zero the rest.
__device__ __forceinline__ void cp_async_prefix(uint32_t destination, const void* source, int bytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source), "r"(bytes)
               : "memory");
#else
  PACOFR_NEEDS_SM80();
#endif
}

__device__ __forceinline__ void cp_async_16(uint32_t destination, const void* source, bool valid) {
  cp_async_prefix(destination, source, valid ? 16 : 0);
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&fragment)[4], uint32_t address) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address)
               : "memory");
#else
  PACOFR_NEEDS_SM80();
#endif
}

// acc += A (16x16, row) * B (16x8, col); 16-bit inputs (TYPE "f16" or "bf16"), fp32 accumulators.
#define PACOFR_MMA_16816(TYPE)                                                                                \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                         \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                       \
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <bool kBFloat16>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (kBFloat16) {
    PACOFR_MMA_16816("bf16");
  } else {
    PACOFR_MMA_16816("f16");
  }
#else
  PACOFR_NEEDS_SM80();
#endif
}
#undef PACOFR_MMA_16816

// acc += A (16x8, row) * B (8x8, col); tf32 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_1688_tf32(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  PACOFR_NEEDS_SM80();
#endif
}

// fp32 bits -> tf32 (10-bit mantissa, round to nearest, ties away), as a 32-bit pattern.
__device__ __forceinline__ uint32_t to_tf32(uint32_t fp32_bits) {
  uint32_t out = 0;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(__uint_as_float(fp32_bits)));
#else
  PACOFR_NEEDS_SM80();
#endif
  return out;
}

}  // namespace mma
}  // namespace pacofr
