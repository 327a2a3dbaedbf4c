// PACOFR_HD marks the small functions that kernels use and host tests check: `__host__ __device__`
// under nvcc, plain inline C++ under a host compiler (csrc/host_tests/ builds them with g++).
#pragma once

#if defined(__CUDACC__)
#define PACOFR_HD __host__ __device__ __forceinline__
#else
#define PACOFR_HD inline
#endif
