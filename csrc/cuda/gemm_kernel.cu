// Tensor-core GEMM for fp16/bf16 operands with fp32 accumulation, written by hand for sm_80 and later.
//
// One CTA computes a 128x128 tile of c with 8 warps (2 along M x 4 along N, 64x32 per warp) from mma.sync
// m16n8k16 instructions fed by ldmatrix. Tiles of a and b flow from global to shared memory through a
// kStages-deep cp.async pipeline in 16-byte chunks; the k-loop waits only for the oldest stage, so the copies
// of the next kStages-1 tiles overlap the math on the current one.
//
// note: layouts. mma.sync wants A row-major (K-contiguous) and B column-major (K-contiguous) in registers;
// ldmatrix (.trans for the other orientation) produces either from shared memory. So each operand keeps the
// orientation it has in global memory (K-contiguous, or M/N-contiguous as for a transposed view) and the
// template parameters A_KC / B_KC pick the matching shared layout and ldmatrix flavour. This covers the three
// GEMMs of a linear layer without copies: y = x W^T (b K-contiguous), dx = dy W (b N-contiguous) and
// dW = dy^T x (a M-contiguous).
//
// note: bank conflicts. Each shared row is padded by 16 bytes (kPad halves): ldmatrix reads eight 16-byte rows
// of the same column; with rows of 80 bytes (K-contiguous, 32+8 halves) or 272 bytes (M/N-contiguous, 128+8)
// the eight rows fall into eight distinct groups of four banks, so every ldmatrix phase is conflict-free, and
// the padding keeps each row 16-byte aligned for cp.async.
//
// note: the slower path. Shapes or strides that do not split into aligned 16-byte chunks (odd K, a pointer
// offset by one element, general strides) use the same kernel with VEC = false: elements are loaded one by
// one with bounds checks into the same shared layout (synchronously; the pipeline bookkeeping is then a no-op).
#include "gemm_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace mixprec {
namespace cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kStages = 3;
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpTileM = kBM / kWarpsM;  // 64
constexpr int kWarpTileN = kBN / kWarpsN;  // 32
constexpr int kMmaTilesM = kWarpTileM / 16;
constexpr int kMmaTilesN = kWarpTileN / 8;
constexpr int kPad = 8;     // elements (16 bytes) of padding per shared row, see the note on bank conflicts
constexpr int kGroupM = 8;  // grouped tile order: 8 tile rows share each column of b tiles while in L2

static_assert(kMmaTilesN % 2 == 0, "B fragments are loaded 16 columns (two n8 tiles) at a time");

// One pipeline stage of one operand in shared memory: mn is M for a, N for b.
template <bool K_CONTIG, int MN>
struct SmemTile {
  static constexpr int kRowLen = K_CONTIG ? kBK + kPad : MN + kPad;
  static constexpr int kRows = K_CONTIG ? MN : kBK;
  static constexpr int kElems = kRows * kRowLen;
  __device__ __forceinline__ static int offset(int mn, int k) {
    return K_CONTIG ? mn * kRowLen + k : k * kRowLen + mn;
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy; when !valid nothing is read and the destination is zero-filled (src-size 0).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  }
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Registers of a 16 (mn) x 16 (k) block at (mn0, k0) of a shared tile, as four 8x8 matrices ordered
// (mn 0-7, k 0-7), (mn 8-15, k 0-7), (mn 0-7, k 8-15), (mn 8-15, k 8-15): exactly mma's A fragment a0..a3,
// and for b the (b0, b1) pairs of two n8 tiles as (r0, r2) and (r1, r3). Lane l supplies the address of row
// l % 8 of matrix l / 8; a K-contiguous tile stores matrix rows along mn, an MN-contiguous one along k and
// needs .trans to hand each lane its pair of consecutive k.
template <bool K_CONTIG, int MN, typename T>
__device__ __forceinline__ void load_fragment(uint32_t (&r)[4], const T* tile, int mn0, int k0, int lane) {
  const int mat = lane >> 3, row = lane & 7;
  const int mn = mn0 + (mat & 1) * 8 + (K_CONTIG ? row : 0);
  const int k = k0 + (mat >> 1) * 8 + (K_CONTIG ? 0 : row);
  ldmatrix_x4<!K_CONTIG>(r, tile + SmemTile<K_CONTIG, MN>::offset(mn, k));
}

// Fills the shared stages of one operand (an MN x kBK block per k tile); zeros outside [0, mn_ext) x [0, K).
template <typename T, bool K_CONTIG, bool VEC, int MN>
struct TileLoader;

// 16-byte chunks (8 elements) along the contiguous dimension; the launcher guarantees that the extent along it is
// a multiple of 8, so a chunk is wholly inside or wholly outside the matrix.
// note: the per-thread source pointers and row checks are computed once and each k tile only adds kBK * stride_k;
// recomputing the 64-bit addresses per tile cost registers the accumulators need.
template <typename T, bool K_CONTIG, int MN>
struct TileLoader<T, K_CONTIG, true, MN> {
  using Tile = SmemTile<K_CONTIG, MN>;
  static constexpr int kPerThread = MN * kBK / 8 / kThreads;
  static_assert(MN * kBK % (8 * kThreads) == 0, "the tile splits evenly over the threads");
  const T* src[kPerThread];  // element (mn, k) of this thread's chunks in k tile 0
  int smem_off[kPerThread];
  int k_of[kPerThread];
  uint32_t mn_ok = 0;  // bit i: chunk i lies in a row (a) / column (b) inside the matrix
  int64_t k_step;      // kBK * stride_k

  __device__ __forceinline__ TileLoader(const T* g, int64_t stride_mn, int64_t stride_k, int64_t mn0,
                                        int64_t mn_ext, int tid)
      : k_step(kBK * stride_k) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      // consecutive threads take consecutive chunks along the contiguous dimension (coalesced reads)
      const int c = tid + i * kThreads;
      const int mn = K_CONTIG ? c / (kBK / 8) : (c % (MN / 8)) * 8;
      const int k = K_CONTIG ? (c % (kBK / 8)) * 8 : c / (MN / 8);
      src[i] = g + (mn0 + mn) * stride_mn + k * stride_k;
      smem_off[i] = Tile::offset(mn, k);
      k_of[i] = k;
      if (mn0 + mn < mn_ext) mn_ok |= 1u << i;
    }
  }

  __device__ __forceinline__ void load(T* tile, int kt, int64_t K) const {
    const int64_t k0 = int64_t(kt) * kBK;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const bool valid = ((mn_ok >> i) & 1u) && k0 + k_of[i] < K;
      // an out-of-range chunk reads nothing (zero-fill) but still needs a valid address: use the first chunk's
      cp_async_16(tile + smem_off[i], valid ? src[i] + kt * k_step : src[0], valid);
    }
  }
};

// Element by element with bounds checks, for any strides and alignment; synchronous stores to shared memory.
// Elements are moved as raw 16-bit patterns (torch builds with __CUDA_NO_HALF_CONVERSIONS__, and no arithmetic
// happens here anyway).
template <typename T, bool K_CONTIG, int MN>
struct TileLoader<T, K_CONTIG, false, MN> {
  using Tile = SmemTile<K_CONTIG, MN>;
  static_assert(sizeof(T) == sizeof(uint16_t), "16-bit operands");
  const uint16_t* g;
  int64_t stride_mn, stride_k, mn0, mn_ext;
  int tid;

  __device__ __forceinline__ TileLoader(const T* g_, int64_t smn, int64_t sk, int64_t mn0_, int64_t ext, int tid_)
      : g(reinterpret_cast<const uint16_t*>(g_)), stride_mn(smn), stride_k(sk), mn0(mn0_), mn_ext(ext), tid(tid_) {}

  __device__ __forceinline__ void load(T* tile, int kt, int64_t K) const {
    uint16_t* t = reinterpret_cast<uint16_t*>(tile);
    const int64_t k0 = int64_t(kt) * kBK;
#pragma unroll 2
    for (int e = tid; e < MN * kBK; e += kThreads) {
      const int mn = K_CONTIG ? e / kBK : e % MN;
      const int k = K_CONTIG ? e % kBK : e / MN;
      const bool valid = mn0 + mn < mn_ext && k0 + k < K;
      t[Tile::offset(mn, k)] = valid ? g[(mn0 + mn) * stride_mn + (k0 + k) * stride_k] : uint16_t(0);
    }
  }
};

// Epilogue element stores. note: one instantiation per output mode, chosen once per CTA: a runtime dtype switch
// per element, unrolled over the 64 accumulators, took the kernel to 255 registers and spills.
template <typename OutT>
struct StoreRounded {  // c = round(acc + bias), bias in fp32
  OutT* c;
  const float* bias;
  __device__ __forceinline__ void operator()(int64_t off, int64_t n, float v) const {
    if (bias != nullptr) v += bias[n];
    if constexpr (std::is_same_v<OutT, __half>) c[off] = __float2half_rn(v);
    else if constexpr (std::is_same_v<OutT, __nv_bfloat16>) c[off] = __float2bfloat16_rn(v);
    else c[off] = v;
  }
};
struct StoreAccumulate {  // c += acc, c in fp32
  float* c;
  __device__ __forceinline__ void operator()(int64_t off, int64_t, float v) const { c[off] += v; }
};

template <typename T, bool A_KC, bool B_KC>
constexpr int smem_bytes() {
  return kStages * (SmemTile<A_KC, kBM>::kElems + SmemTile<B_KC, kBN>::kElems) * int(sizeof(T));
}

template <typename T, bool A_KC, bool B_KC, bool VEC>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  using TileA = SmemTile<A_KC, kBM>;
  using TileB = SmemTile<B_KC, kBN>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + kStages * TileA::kElems;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;

  // Grouped tile order (as in the Triton kernel): kGroupM consecutive CTAs cover a column of kGroupM tiles.
  const int64_t tiles_m = (p.M + kBM - 1) / kBM, tiles_n = (p.N + kBN - 1) / kBN;
  const int64_t pid = blockIdx.x, group_size = kGroupM * tiles_n;
  const int64_t first_m = (pid / group_size) * kGroupM;
  const int64_t group_rows = min(tiles_m - first_m, int64_t(kGroupM));
  const int64_t m0 = (first_m + (pid % group_size) % group_rows) * kBM;
  const int64_t n0 = ((pid % group_size) / group_rows) * kBN;
  // k tiles fit an int: the launcher rejects K >= 2^31 * kBK
  const int k_tiles = static_cast<int>((p.K + kBK - 1) / kBK);

  for (int64_t batch = blockIdx.y; batch < p.batch; batch += gridDim.y) {
    const T* A = static_cast<const T*>(p.a) + batch * p.a_batch_stride;
    const T* B = static_cast<const T*>(p.b);
    void* C = static_cast<char*>(p.c) + batch * p.c_batch_stride * dtype_size(p.c_dtype);

    const TileLoader<T, A_KC, VEC, kBM> load_a(A, p.a_stride_m, p.a_stride_k, m0, p.M, tid);
    const TileLoader<T, B_KC, VEC, kBN> load_b(B, p.b_stride_n, p.b_stride_k, n0, p.N, tid);
    auto load_stage = [&](int stage, int kt) {
      if (kt < k_tiles) {
        load_a.load(sA + stage * TileA::kElems, kt, p.K);
        load_b.load(sB + stage * TileB::kElems, kt, p.K);
      }
      // one group per k tile, empty ones included, so that wait_group<kStages-2> always means "tile kt landed"
      cp_async_commit();
    };

    float acc[kMmaTilesM][kMmaTilesN][4] = {};
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) load_stage(s, s);

    int read_stage = 0, write_stage = kStages - 1;
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<kStages - 2>();
      // after this barrier tile kt is visible to all threads, and every warp is done with tile kt-1, whose stage
      // the next line refills
      __syncthreads();
      load_stage(write_stage, kt + kStages - 1);
      write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;

      const T* tA = sA + read_stage * TileA::kElems;
      const T* tB = sB + read_stage * TileB::kElems;
      read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[kMmaTilesM][4], bf[kMmaTilesN / 2][4];
#pragma unroll
        for (int i = 0; i < kMmaTilesM; ++i)
          load_fragment<A_KC, kBM>(af[i], tA, warp_m * kWarpTileM + i * 16, kk, lane);
#pragma unroll
        for (int j = 0; j < kMmaTilesN / 2; ++j)
          load_fragment<B_KC, kBN>(bf[j], tB, warp_n * kWarpTileN + j * 16, kk, lane);
#pragma unroll
        for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
          for (int j = 0; j < kMmaTilesN; ++j) mma_16816<T>(acc[i][j], af[i], bf[j / 2][j % 2], bf[j / 2][2 + j % 2]);
      }
    }
    cp_async_wait<0>();

    // Accumulator layout of m16n8: lane holds rows lane/4 and lane/4 + 8, columns 2*(lane%4) and +1.
    auto epilogue = [&](auto store) {
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t m = m0 + warp_m * kWarpTileM + i * 16 + (lane >> 2) + h * 8;
          if (m >= p.M) continue;
#pragma unroll
          for (int j = 0; j < kMmaTilesN; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t n = n0 + warp_n * kWarpTileN + j * 8 + (lane & 3) * 2 + e;
              if (n < p.N) store(m * p.c_stride_m + n, n, acc[i][j][h * 2 + e]);
            }
        }
    };
    if (p.accumulate) {
      epilogue(StoreAccumulate{static_cast<float*>(C)});
    } else if (p.c_dtype == DType::Float16) {
      epilogue(StoreRounded<__half>{static_cast<__half*>(C), p.bias});
    } else if (p.c_dtype == DType::BFloat16) {
      epilogue(StoreRounded<__nv_bfloat16>{static_cast<__nv_bfloat16*>(C), p.bias});
    } else {
      epilogue(StoreRounded<float>{static_cast<float*>(C), p.bias});
    }
    __syncthreads();  // the next batch's prologue overwrites the stages the last k tile was read from
  }
}

template <typename T, bool A_KC, bool B_KC, bool VEC>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  auto kernel = gemm_kernel<T, A_KC, B_KC, VEC>;
  constexpr int bytes = smem_bytes<T, A_KC, B_KC>();
  // above 48 KiB of dynamic shared memory a kernel must opt in (per device, so on every launch: it is cheap)
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = ((p.M + kBM - 1) / kBM) * ((p.N + kBN - 1) / kBN);
  if (tiles > 0x7fffffff || (p.K + kBK - 1) / kBK > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether an operand splits into aligned 16-byte chunks along its contiguous dimension: unit stride there, the
// other strides and the extent along it multiples of 8 elements, and a 16-byte aligned base.
bool chunkable(const void* ptr, int64_t unit_stride, int64_t other_stride, int64_t batch_stride, int64_t extent) {
  return unit_stride == 1 && other_stride % 8 == 0 && batch_stride % 8 == 0 && extent % 8 == 0 && aligned16(ptr);
}

template <typename T>
cudaError_t dispatch(const GemmParams& p, cudaStream_t stream) {
  const int64_t a_bs = p.batch > 1 ? p.a_batch_stride : 0;
  const bool a_kc = chunkable(p.a, p.a_stride_k, p.a_stride_m, a_bs, p.K);
  const bool a_mc = chunkable(p.a, p.a_stride_m, p.a_stride_k, a_bs, p.M);
  const bool b_kc = chunkable(p.b, p.b_stride_k, p.b_stride_n, 0, p.K);
  const bool b_nc = chunkable(p.b, p.b_stride_n, p.b_stride_k, 0, p.N);
  if ((a_kc || a_mc) && (b_kc || b_nc)) {
    if (a_kc) return b_kc ? launch<T, true, true, true>(p, stream) : launch<T, true, false, true>(p, stream);
    return b_kc ? launch<T, false, true, true>(p, stream) : launch<T, false, false, true>(p, stream);
  }
  return launch<T, true, true, false>(p, stream);
}

}  // namespace

cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0 || p.batch == 0) return cudaSuccess;
  if (p.ab_dtype == DType::Float16) return dispatch<__half>(p, stream);
  if (p.ab_dtype == DType::BFloat16) return dispatch<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mixprec
