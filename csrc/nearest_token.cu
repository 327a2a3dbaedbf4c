// CUDA kernel of pacofr.ops.nearest_token (backend "cuda"): correctness-first SIMT version.
//
// One block of 256 threads owns TILE_N = 64 query rows and walks the codebook in tiles of
// TILE_K = 64 codes. For each tile, the dot products are accumulated over D in chunks of
// TILE_D = 16 values staged in shared memory as fp32 (each thread computes a 4 x 4 micro-tile
// with fp32 FMAs, so fp32 inputs are exact and fp16/bf16 inputs are upcast exactly), turned into
// fp32 scores (0.5 ||e||^2 - x.e for l2, -(x.e) / ||e|| for cosine), written to shared memory,
// and then four threads per row insert the row's scores into private sorted top-KP lists.
// Candidates are 64-bit keys: order-preserving score bits in the high word, code index in the low
// word, so comparing keys compares (score, index) and the smallest index wins every tie in any
// merge order; NaN scores map to the largest score key. At the end the four lists of a row are
// merged with warp shuffles and lane 0 writes the row's k results.
//
// Semantics match pacofr/ops/nearest_token.py (the torch reference) exactly: reported l2 distance
// max(||x||^2 + 2 score, 0), cosine distance 1 + score / ||x|| (0 norm -> zero vector), index -1
// where the distance is NaN. No tensor cores yet (see the module docstring of the Python op).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace pacofr {
namespace {

constexpr int kTileN = 64;
constexpr int kTileK = 64;
constexpr int kTileD = 16;
constexpr int kThreads = 256;
constexpr int kMicro = 4;                    // each thread: kMicro rows x kMicro codes
constexpr int kLanesPerRow = kThreads / kTileN;  // threads sharing one row in the selection stage
constexpr int kMaxK = 16;
constexpr unsigned long long kEmptyKey = ~0ull;  // above every real key (real high words <= 0xFFFFFFFF, index < 2^31)
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kTileN * kTileK == kThreads * kMicro * kMicro, "micro-tiles must cover the tile");
static_assert((kTileN / kMicro) * (kTileK / kMicro) == kThreads, "one micro-tile per thread");
static_assert(kLanesPerRow == 4, "the shuffle merge below assumes 4 lanes per row");

// (score, index) -> key whose unsigned order is the lexicographic order of (score, index).
__device__ __forceinline__ unsigned long long make_key(float score, uint32_t index) {
  score = (score == 0.0f) ? 0.0f : score;  // -0.0 -> +0.0: equal scores give equal high words
  const uint32_t bits = __float_as_uint(score);
  uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  if (score != score) ordered = 0xFFFFFFFFu;  // every NaN after +inf
  return (static_cast<unsigned long long>(ordered) << 32) | index;
}

__device__ __forceinline__ float key_score(unsigned long long key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered;
  return __uint_as_float(bits);
}

// Insert `key` into the ascending list `best` (distinct keys), dropping the largest.
template <int KP>
__device__ __forceinline__ void insert_key(unsigned long long (&best)[KP], unsigned long long key) {
  if (key >= best[KP - 1]) return;
#pragma unroll
  for (int j = KP - 1; j > 0; --j) {
    const unsigned long long previous = best[j - 1];
    best[j] = key < previous ? previous : (key < best[j] ? key : best[j]);
  }
  best[0] = key < best[0] ? key : best[0];
}

template <typename scalar_t, typename index_t, int KP>
__global__ void __launch_bounds__(kThreads) nearest_token_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ codebook, const float* __restrict__ code_term,
    float* __restrict__ distances, index_t* __restrict__ indices, int64_t n_rows, int64_t n_codes, int64_t dim,
    int k_out, bool cosine) {
  __shared__ float x_tile[kTileD][kTileN + 1];
  __shared__ float e_tile[kTileD][kTileK + 1];
  __shared__ float scores[kTileN][kTileK + 1];

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int micro_row = (tid / (kTileK / kMicro)) * kMicro;
  const int micro_col = (tid % (kTileK / kMicro)) * kMicro;
  const int select_row = tid / kLanesPerRow;
  const int lane = tid % kLanesPerRow;

  unsigned long long best[KP];
#pragma unroll
  for (int j = 0; j < KP; ++j) best[j] = kEmptyKey;

  for (int64_t code0 = 0; code0 < n_codes; code0 += kTileK) {
    float acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.0f;

    for (int64_t d0 = 0; d0 < dim; d0 += kTileD) {
      for (int e = tid; e < kTileN * kTileD; e += kThreads) {
        const int r = e / kTileD, d = e % kTileD;
        const int64_t row = row0 + r, col = d0 + d;
        x_tile[d][r] = (row < n_rows && col < dim) ? static_cast<float>(x[row * dim + col]) : 0.0f;
      }
      for (int e = tid; e < kTileK * kTileD; e += kThreads) {
        const int c = e / kTileD, d = e % kTileD;
        const int64_t code = code0 + c, col = d0 + d;
        e_tile[d][c] = (code < n_codes && col < dim) ? static_cast<float>(codebook[code * dim + col]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kTileD; ++d) {
        float a[kMicro], b[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) a[i] = x_tile[d][micro_row + i];
#pragma unroll
        for (int j = 0; j < kMicro; ++j) b[j] = e_tile[d][micro_col + j];
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t code = code0 + micro_col + j;
      const float term = code < n_codes ? code_term[code] : 0.0f;
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        scores[micro_row + i][micro_col + j] = cosine ? -acc[i][j] * term : term - acc[i][j];
      }
    }
    __syncthreads();
    for (int c = lane; c < kTileK; c += kLanesPerRow) {
      const int64_t code = code0 + c;
      if (code < n_codes) insert_key<KP>(best, make_key(scores[select_row][c], static_cast<uint32_t>(code)));
    }
    __syncthreads();  // scores is rewritten by the next tile
  }

  // Merge the four lanes' lists of each row (disjoint code subsets, so keys stay distinct).
#pragma unroll
  for (int offset = 1; offset < kLanesPerRow; offset <<= 1) {
    unsigned long long other[KP];
#pragma unroll
    for (int j = 0; j < KP; ++j) other[j] = __shfl_xor_sync(kFullMask, best[j], offset);
#pragma unroll
    for (int j = 0; j < KP; ++j) insert_key<KP>(best, other[j]);
  }

  // ||x||^2 of the row in fp32, split over the four lanes and reduced with shuffles.
  const int64_t row = row0 + select_row;
  float squared_norm = 0.0f;
  if (row < n_rows) {
    for (int64_t d = lane; d < dim; d += kLanesPerRow) {
      const float v = static_cast<float>(x[row * dim + d]);
      squared_norm = fmaf(v, v, squared_norm);
    }
  }
#pragma unroll
  for (int offset = 1; offset < kLanesPerRow; offset <<= 1) {
    squared_norm += __shfl_xor_sync(kFullMask, squared_norm, offset);
  }

  if (lane != 0 || row >= n_rows) return;
  const float inv_norm = squared_norm > 0.0f ? 1.0f / sqrtf(squared_norm) : 0.0f;
#pragma unroll
  for (int j = 0; j < KP; ++j) {
    if (j < k_out) {
      const float score = key_score(best[j]);
      float distance;
      if (cosine) {
        distance = 1.0f + score * inv_norm;
      } else {
        distance = squared_norm + 2.0f * score;
        distance = distance < 0.0f ? 0.0f : distance;
      }
      const bool is_nan = distance != distance;
      distances[row * k_out + j] = distance;
      indices[row * k_out + j] = is_nan ? index_t(-1) : static_cast<index_t>(best[j] & 0xFFFFFFFFull);
    }
  }
}

template <typename scalar_t, typename index_t>
void launch_for_k(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& code_term, bool cosine,
                  at::Tensor& distances, at::Tensor& indices) {
  const int64_t n_rows = x.size(0), n_codes = codebook.size(0), dim = x.size(1);
  const int k_out = static_cast<int>(distances.size(1));
  const dim3 grid(static_cast<unsigned>((n_rows + kTileN - 1) / kTileN));
  const dim3 block(kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* x_ptr = x.data_ptr<scalar_t>();
  const auto* e_ptr = codebook.data_ptr<scalar_t>();
  const auto* term_ptr = code_term.data_ptr<float>();
  auto* dist_ptr = distances.data_ptr<float>();
  auto* index_ptr = indices.data_ptr<index_t>();
#define PACOFR_NEAREST_TOKEN_LAUNCH(KP)                                                                    \
  nearest_token_kernel<scalar_t, index_t, KP><<<grid, block, 0, stream>>>(                                \
      x_ptr, e_ptr, term_ptr, dist_ptr, index_ptr, n_rows, n_codes, dim, k_out, cosine);                  \
  C10_CUDA_KERNEL_LAUNCH_CHECK()
  if (k_out <= 1) {
    PACOFR_NEAREST_TOKEN_LAUNCH(1);
  } else if (k_out <= 2) {
    PACOFR_NEAREST_TOKEN_LAUNCH(2);
  } else if (k_out <= 4) {
    PACOFR_NEAREST_TOKEN_LAUNCH(4);
  } else if (k_out <= 8) {
    PACOFR_NEAREST_TOKEN_LAUNCH(8);
  } else {
    PACOFR_NEAREST_TOKEN_LAUNCH(16);
  }
#undef PACOFR_NEAREST_TOKEN_LAUNCH
}

template <typename scalar_t>
void launch_for_dtype(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& code_term, bool cosine,
                      at::Tensor& distances, at::Tensor& indices, bool int64_indices) {
  if (int64_indices) {
    launch_for_k<scalar_t, int64_t>(x, codebook, code_term, cosine, distances, indices);
  } else {
    launch_for_k<scalar_t, int32_t>(x, codebook, code_term, cosine, distances, indices);
  }
}

// torch.ops.pacofr_cuda.nearest_token(x, codebook, code_term, cosine, distances, indices):
// fills the preallocated (N, k) outputs. Argument checks mirror the Python op's.
void nearest_token_cuda(const at::Tensor& x_in, const at::Tensor& codebook_in, const at::Tensor& code_term_in,
                        bool cosine, at::Tensor distances, at::Tensor indices) {
  TORCH_CHECK(x_in.dim() == 2, "nearest_token: x must be 2-D (N, D), got ", x_in.sizes());
  TORCH_CHECK(codebook_in.dim() == 2, "nearest_token: codebook must be 2-D (K, D), got ", codebook_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == codebook_in.scalar_type(), "nearest_token: codebook has dtype ",
              codebook_in.scalar_type(), " but x has ", x_in.scalar_type());
  TORCH_CHECK(x_in.is_cuda() && codebook_in.device() == x_in.device() && code_term_in.device() == x_in.device() &&
                  distances.device() == x_in.device() && indices.device() == x_in.device(),
              "nearest_token: all tensors must be on the same CUDA device");
  const int64_t n_rows = x_in.size(0), dim = x_in.size(1), n_codes = codebook_in.size(0);
  TORCH_CHECK(dim >= 1 && codebook_in.size(1) == dim, "nearest_token: x has D=", dim, " but codebook has D=",
              codebook_in.size(1));
  TORCH_CHECK(n_codes >= 1 && n_codes <= std::numeric_limits<int32_t>::max(),
              "nearest_token: codebook must have 1 to 2^31-1 rows, got ", n_codes);
  TORCH_CHECK(code_term_in.scalar_type() == at::kFloat && code_term_in.dim() == 1 && code_term_in.size(0) == n_codes,
              "nearest_token: code_term must be float32 of shape (K,)");
  TORCH_CHECK(distances.dim() == 2 && distances.size(0) == n_rows && distances.scalar_type() == at::kFloat &&
                  distances.is_contiguous(),
              "nearest_token: distances must be a contiguous float32 (N, k) tensor");
  const int64_t k_out = distances.size(1);
  TORCH_CHECK(k_out >= 1 && k_out <= kMaxK && k_out <= n_codes, "nearest_token: k must be in [1, min(K, ",
              kMaxK, ")], got ", k_out);
  TORCH_CHECK(indices.sizes() == distances.sizes() && indices.is_contiguous() &&
                  (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              "nearest_token: indices must be a contiguous int64 or int32 tensor shaped like distances");
  if (n_rows == 0) return;  // a zero-sized grid is an invalid launch configuration

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const at::Tensor code_term = code_term_in.contiguous();
  const bool int64_indices = indices.scalar_type() == at::kLong;
  const auto launch = [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    launch_for_dtype<scalar_t>(x, codebook, code_term, cosine, distances, indices, int64_indices);
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(at::Half{}); break;
    case at::kBFloat16: launch(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "nearest_token: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

}  // namespace
}  // namespace pacofr

TORCH_LIBRARY_FRAGMENT(pacofr_cuda, m) {
  m.def("nearest_token(Tensor x, Tensor codebook, Tensor code_term, bool cosine, Tensor(a!) distances, "
        "Tensor(b!) indices) -> ()");
}

TORCH_LIBRARY_IMPL(pacofr_cuda, CUDA, m) { m.impl("nearest_token", &pacofr::nearest_token_cuda); }
