// Paged-attention decode kernels (one query token per sequence), written for this study from
// the published PagedAttention v1/v2 design (Kwon et al., SOSP 2023):
//
//   * one thread block per (KV head, tile of the query heads that share it, sequence[, partition]);
//     a tile of GT query heads reuses every K/V element it loads (GQA/MQA sharing);
//   * phase 1: each warp walks the sequence's KV blocks; inside a warp a *thread group* of
//     TG = max(32 / BLOCK_SIZE, 1) threads computes one token's q.k, each thread loading
//     16 / TG bytes of the key per step (the classic key layout makes those loads coalesce);
//   * softmax over the partition's logits in shared memory;
//   * phase 2: each warp walks the blocks again and accumulates probabilities x values, reading
//     the value layout one row (head dim) at a time, V_VEC tokens per load;
//   * v1 handles the whole sequence in one block; v2 splits it into partitions of
//     `partition_size` tokens and a second kernel (paged_attention_reduce) merges them.
//
// Addressing (compile time, the seed's ablations):
//   PAGED      physical block = block_tables[seq][logical block]   (the page-table read)
//   CONTIGUOUS physical block = seq_first[seq] + logical block     (no table read)
//   NO_OFFSET  physical block = 0 for every read                   (almost no DRAM traffic)
// Only the address differs between the three: arithmetic, control flow and the order of every
// floating-point operation are the same, so PAGED and CONTIGUOUS give bit-identical outputs on
// an identity block table.
//
// Layouts: q, out [S, H, D]; k_cache [NB, KVH, D/X, BS, X] with X = 16 bytes / sizeof(T);
// v_cache [NB, KVH, D, BS]; block_tables int32 [S, max_blocks]; seq_first, seq_lens int32 [S].

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Tuning knobs (compile-time defines; lib.kernels passes UVM_STUDY_KERNEL_DEFINES through).
#ifndef UPA_UNROLL_SINGLE
#define UPA_UNROLL_SINGLE 1  // steps in flight per warp when a block serves one query head
#endif
#ifndef UPA_MIN_BLOCKS
#define UPA_MIN_BLOCKS 0     // resident blocks per SM to allocate registers for (0: automatic)
#endif

namespace upa {

constexpr int WARP = 32;
constexpr int NUM_THREADS = 128;
constexpr int NUM_WARPS = NUM_THREADS / WARP;
constexpr unsigned FULL = 0xffffffffu;

// NVRTC has no <cmath>: build -inf from its bit pattern.
__device__ __forceinline__ float NEG_INF() { return __int_as_float(0xff800000u); }

enum Addressing { PAGED = 0, CONTIGUOUS = 1, NO_OFFSET = 2 };

// N values loaded as one access (up to 16 bytes; wider vectors split into 16-byte accesses).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int ADDR>
__device__ __forceinline__ int physical_block(const int* __restrict__ table_row, int first,
                                              int logical) {
  if (ADDR == PAGED) return table_row[logical];
  if (ADDR == CONTIGUOUS) return first + logical;
  return 0;  // NO_OFFSET
}

// Physical block of the warp's step `step + lane * NUM_WARPS` (0 past the end).
template <int ADDR, int STEPS_PER_BLOCK>
__device__ __forceinline__ int lookup_steps(const int* __restrict__ table_row, int first,
                                            int first_block, int step, int num_steps, int lane) {
  const int s = step + lane * NUM_WARPS;
  return s < num_steps ? physical_block<ADDR>(table_row, first, first_block + s / STEPS_PER_BLOCK)
                       : 0;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = WARP / 2; m >= 1; m /= 2) v = fmaxf(v, __shfl_xor_sync(FULL, v, m));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = WARP / 2; m >= 1; m /= 2) v += __shfl_xor_sync(FULL, v, m);
  return v;
}

// Resident blocks per SM the register allocation must allow. Capping at 128 registers (4 blocks)
// hides more memory latency (measured on H100: GQA 32:8 decode 266 -> 222 us), but only pays
// where phase 2's per-thread state (accumulators, value vectors, probabilities) fits in it;
// elsewhere the cap would spill, so the compiler gets the whole register file.
template <typename T, int BS, int D, int GT>
__host__ __device__ constexpr int min_blocks() {
  if (UPA_MIN_BLOCKS > 0) return UPA_MIN_BLOCKS;
  constexpr int tok = BS < 32 ? BS : 32;
  constexpr int v_vec = (16 / (int)sizeof(T)) < tok ? 16 / (int)sizeof(T) : tok;
  constexpr int rows_per_iter = 32 / (tok / v_vec);
  constexpr int rows = (D + rows_per_iter - 1) / rows_per_iter;
  constexpr int state = GT * rows + rows * v_vec * (int)sizeof(T) / 4 + GT * v_vec;
  return state <= 96 ? 4 : 1;
}

template <typename T, int BS, int D, int GT, int ADDR>
__global__ void __launch_bounds__(NUM_THREADS, (min_blocks<T, BS, D, GT>()))
paged_attention_decode(T* __restrict__ out,              // [S, H, D]          (v1)
                       float* __restrict__ part_out,     // [S, H, P, D]       (v2)
                       float* __restrict__ part_max,     // [S, H, P]          (v2)
                       float* __restrict__ part_sum,     // [S, H, P]          (v2)
                       const T* __restrict__ q,          // [S, H, D]
                       const T* __restrict__ k_cache,    // [NB, KVH, D/X, BS, X]
                       const T* __restrict__ v_cache,    // [NB, KVH, D, BS]
                       const int* __restrict__ block_tables,  // [S, max_blocks]
                       const int* __restrict__ seq_first,     // [S]
                       const int* __restrict__ seq_lens,      // [S]
                       int num_heads, int num_kv_heads, int max_blocks, float scale,
                       int partition_size,  // tokens per partition, a multiple of BS
                       int max_partitions,  // P (1 for v1)
                       int write_final) {   // 1: v1 (write out), 0: v2 (write partials)
  constexpr int X = 16 / sizeof(T);
  constexpr int TG = BS < WARP ? WARP / BS : 1;          // threads per token (phase 1)
  constexpr int TOK_PER_STEP = BS < WARP ? BS : WARP;    // tokens a warp takes per step
  constexpr int STEPS_PER_BLOCK = BS < WARP ? 1 : BS / WARP;
  constexpr int VEC = (16 / (TG * (int)sizeof(T))) > 0 ? 16 / (TG * (int)sizeof(T)) : 1;
  constexpr int NVEC = D / VEC;                          // key vectors per head
  constexpr int SLOTS = (NVEC + TG - 1) / TG;            // key vectors per thread
  constexpr int V_VEC = (16 / (int)sizeof(T)) < TOK_PER_STEP ? 16 / (int)sizeof(T) : TOK_PER_STEP;
  constexpr int VECS_PER_ROW = TOK_PER_STEP / V_VEC;
  constexpr int ROWS_PER_ITER = WARP / VECS_PER_ROW;
  constexpr int ROWS_PER_THREAD = (D + ROWS_PER_ITER - 1) / ROWS_PER_ITER;
  // Steps whose loads one warp issues together: two for a single head, where registers are
  // plentiful; one for head tiles, whose accumulators already fill the register file.
  constexpr int UNROLL = GT == 1 ? UPA_UNROLL_SINGLE : 1;
  static_assert(D % VEC == 0, "head size must be a multiple of the key vector");
  static_assert(X % VEC == 0, "a key vector must not straddle an x-chunk");

  extern __shared__ float smem[];
  float* q_s = smem;                          // [GT][D]   pre-scaled query
  float* out_s = q_s + GT * D;                // [GT][D]   cross-warp output
  float* red_s = out_s + GT * D;              // [NUM_WARPS][GT]
  float* logits = red_s + NUM_WARPS * GT;     // [GT][partition_size]

  const int tid = threadIdx.x;
  const int lane = tid % WARP;
  const int warp = tid / WARP;
  const int group = num_heads / num_kv_heads;
  const int tiles = group / GT;
  const int kvh = blockIdx.x / tiles;
  const int head0 = kvh * group + (blockIdx.x % tiles) * GT;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;

  const int seq_len = seq_lens[seq];
  const int part_start = part * partition_size;
  if (part_start >= seq_len) return;
  const int part_end = min(seq_len, part_start + partition_size);
  const int first_block = part_start / BS;
  const int end_block = (part_end + BS - 1) / BS;
  const int n_tok = (end_block - first_block) * BS;   // logits slots used (incl. masked tail)
  const int num_steps = (end_block - first_block) * STEPS_PER_BLOCK;
  const int* table_row = block_tables + (size_t)seq * max_blocks;
  const int first = seq_first[seq];
  const size_t head_stride = (size_t)D * BS;        // elements per (block, kv head)

  for (int i = tid; i < GT * D; i += NUM_THREADS) {
    q_s[i] = to_float(q[((size_t)seq * num_heads + head0) * D + i]) * scale;
  }
  __syncthreads();

  // ---- phase 1: logits = (q * scale) . k -------------------------------------------------
  const int glane = lane % TG;
  const int tok_in_step = lane / TG;
  float tmax[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) tmax[g] = NEG_INF();

  // Block-table reads are batched per warp: lane j fetches the physical block of the warp's
  // j-th next step (one coalesced load per 32 steps), and each step takes its entry with a
  // shuffle, so key loads never wait on a table read. Each iteration issues the loads of
  // UNROLL steps before using any of them (more bytes in flight per warp).
  int phys_lane = 0;
  for (int base = warp, j = 0; base < num_steps; base += NUM_WARPS * UNROLL, j = (j + UNROLL) % WARP) {
    if (j == 0) phys_lane = lookup_steps<ADDR, STEPS_PER_BLOCK>(table_row, first, first_block,
                                                                 base, num_steps, lane);
    Vec<T, VEC> kv[UNROLL][SLOTS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int step = base + u * NUM_WARPS;
      const int phys = __shfl_sync(FULL, phys_lane, j + u);
      if (step < num_steps) {  // warp-uniform
        const int tok_in_block = (step % STEPS_PER_BLOCK) * WARP + tok_in_step;
        const T* kb = k_cache + ((size_t)phys * num_kv_heads + kvh) * head_stride + tok_in_block * X;
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
          const int slot = s * TG + glane;
          if (NVEC % TG == 0 || slot < NVEC) {
            const int e = slot * VEC;
            kv[u][s] = *reinterpret_cast<const Vec<T, VEC>*>(kb + (e / X) * BS * X + (e % X));
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int step = base + u * NUM_WARPS;
      if (step >= num_steps) break;  // warp-uniform
      float acc[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) acc[g] = 0.f;
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        const int slot = s * TG + glane;
        if (NVEC % TG == 0 || slot < NVEC) {
          const int e = slot * VEC;
#pragma unroll
          for (int g = 0; g < GT; ++g) {
            const Vec<float, VEC> qv = *reinterpret_cast<const Vec<float, VEC>*>(q_s + g * D + e);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g] = fmaf(qv.v[i], to_float(kv[u][s].v[i]), acc[g]);
          }
        }
      }
#pragma unroll
      for (int m = TG / 2; m >= 1; m /= 2) {
#pragma unroll
        for (int g = 0; g < GT; ++g) acc[g] += __shfl_xor_sync(FULL, acc[g], m);
      }
      if (glane == 0) {
        const int lb = first_block + step / STEPS_PER_BLOCK;
        const int token = lb * BS + (step % STEPS_PER_BLOCK) * WARP + tok_in_step;
        const bool valid = token < seq_len;
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          const float l = valid ? acc[g] : NEG_INF();
          logits[g * partition_size + token - part_start] = l;
          tmax[g] = fmaxf(tmax[g], l);
        }
      }
    }
  }

  // ---- softmax over the partition ----------------------------------------------------------
  float bmax[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const float m = warp_max(tmax[g]);
    if (lane == 0) red_s[warp * GT + g] = m;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    float m = red_s[g];
#pragma unroll
    for (int w = 1; w < NUM_WARPS; ++w) m = fmaxf(m, red_s[w * GT + g]);
    bmax[g] = m;
  }
  __syncthreads();  // red_s is reused below
  float tsum[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    tsum[g] = 0.f;
    for (int t = tid; t < n_tok; t += NUM_THREADS) {
      float* l = logits + g * partition_size + t;
      const float p = (part_start + t < seq_len) ? __expf(*l - bmax[g]) : 0.f;
      *l = p;
      tsum[g] += p;
    }
    const float s = warp_sum(tsum[g]);
    if (lane == 0) red_s[warp * GT + g] = s;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    float s = red_s[g];
#pragma unroll
    for (int w = 1; w < NUM_WARPS; ++w) s += red_s[w * GT + g];
    tsum[g] = s;  // now the block's sum
  }
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const float inv = 1.f / tsum[g];
    for (int t = tid; t < n_tok; t += NUM_THREADS) logits[g * partition_size + t] *= inv;
  }
  if (!write_final) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {  // constant indices keep bmax/tsum in registers
      if (tid == g) {
        const size_t idx = ((size_t)seq * num_heads + head0 + g) * max_partitions + part;
        part_max[idx] = bmax[g];
        part_sum[idx] = tsum[g];
      }
    }
  }
  __syncthreads();

  // ---- phase 2: out = sum_t p_t v_t ---------------------------------------------------------
  const int vec_idx = lane % VECS_PER_ROW;
  const int row0 = lane / VECS_PER_ROW;
  float acc[GT][ROWS_PER_THREAD];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int r = 0; r < ROWS_PER_THREAD; ++r) acc[g][r] = 0.f;

  for (int base = warp, j = 0; base < num_steps; base += NUM_WARPS * UNROLL, j = (j + UNROLL) % WARP) {
    if (j == 0) phys_lane = lookup_steps<ADDR, STEPS_PER_BLOCK>(table_row, first, first_block,
                                                                 base, num_steps, lane);
    Vec<T, V_VEC> vv[UNROLL][ROWS_PER_THREAD];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int step = base + u * NUM_WARPS;
      const int phys = __shfl_sync(FULL, phys_lane, j + u);
      if (step < num_steps) {  // warp-uniform
        const int tok0 = (step % STEPS_PER_BLOCK) * WARP + vec_idx * V_VEC;  // within the block
        const T* vb = v_cache + ((size_t)phys * num_kv_heads + kvh) * head_stride + tok0;
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; ++r) {
          const int row = row0 + r * ROWS_PER_ITER;
          if (D % ROWS_PER_ITER == 0 || row < D)
            vv[u][r] = *reinterpret_cast<const Vec<T, V_VEC>*>(vb + (size_t)row * BS);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int step = base + u * NUM_WARPS;
      if (step >= num_steps) break;  // warp-uniform
      const int lb = first_block + step / STEPS_PER_BLOCK;
      const int token0 = lb * BS + (step % STEPS_PER_BLOCK) * WARP + vec_idx * V_VEC;
      Vec<float, V_VEC> p[GT];  // probabilities of this thread's V_VEC tokens, per head
#pragma unroll
      for (int g = 0; g < GT; ++g)
        p[g] = *reinterpret_cast<const Vec<float, V_VEC>*>(logits + g * partition_size + token0 - part_start);
#pragma unroll
      for (int r = 0; r < ROWS_PER_THREAD; ++r) {
        const int row = row0 + r * ROWS_PER_ITER;
        if (D % ROWS_PER_ITER == 0 || row < D) {
#pragma unroll
          for (int i = 0; i < V_VEC; ++i) {
            // Past the sequence's end the cache may hold anything (even NaN): never multiply it.
            const float vf = (token0 + i < seq_len) ? to_float(vv[u][r].v[i]) : 0.f;
#pragma unroll
            for (int g = 0; g < GT; ++g) acc[g][r] = fmaf(p[g].v[i], vf, acc[g][r]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = VECS_PER_ROW / 2; m >= 1; m /= 2)
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int r = 0; r < ROWS_PER_THREAD; ++r) acc[g][r] += __shfl_xor_sync(FULL, acc[g][r], m);

  // Cross-warp sum in a fixed order (deterministic: no atomics).
#pragma unroll
  for (int w = 0; w < NUM_WARPS; ++w) {
    if (warp == w && vec_idx == 0) {
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; ++r) {
          const int row = row0 + r * ROWS_PER_ITER;
          if (D % ROWS_PER_ITER == 0 || row < D) {
            float* o = out_s + g * D + row;
            *o = (w == 0) ? acc[g][r] : *o + acc[g][r];
          }
        }
    }
    __syncthreads();
  }
  for (int i = tid; i < GT * D; i += NUM_THREADS) {
    const int g = i / D, d = i % D;
    if (write_final) {
      out[((size_t)seq * num_heads + head0 + g) * D + d] = from_float<T>(out_s[i]);
    } else {
      part_out[(((size_t)seq * num_heads + head0 + g) * max_partitions + part) * D + d] = out_s[i];
    }
  }
}

// v2's second kernel: merge the partitions of one (sequence, head), weighting each partition's
// normalised output by its share of the softmax denominator.
template <typename T, int D>
__global__ void __launch_bounds__(NUM_THREADS)
paged_attention_reduce(T* __restrict__ out, const float* __restrict__ part_out,
                       const float* __restrict__ part_max, const float* __restrict__ part_sum,
                       const int* __restrict__ seq_lens, int num_heads, int partition_size,
                       int max_partitions) {
  extern __shared__ float w_s[];  // [max_partitions] weights, then [NUM_WARPS] scratch
  float* red_s = w_s + max_partitions;
  const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
  const int head = blockIdx.x, seq = blockIdx.y;
  const int n_parts = (seq_lens[seq] + partition_size - 1) / partition_size;
  const size_t base = ((size_t)seq * num_heads + head) * max_partitions;

  float m = NEG_INF();
  for (int p = tid; p < n_parts; p += NUM_THREADS) m = fmaxf(m, part_max[base + p]);
  m = warp_max(m);
  if (lane == 0) red_s[warp] = m;
  __syncthreads();
  m = red_s[0];
#pragma unroll
  for (int w = 1; w < NUM_WARPS; ++w) m = fmaxf(m, red_s[w]);
  __syncthreads();
  float s = 0.f;
  for (int p = tid; p < n_parts; p += NUM_THREADS) {
    const float w = part_sum[base + p] * __expf(part_max[base + p] - m);
    w_s[p] = w;
    s += w;
  }
  s = warp_sum(s);
  if (lane == 0) red_s[warp] = s;
  __syncthreads();
  s = red_s[0];
#pragma unroll
  for (int w = 1; w < NUM_WARPS; ++w) s += red_s[w];
  const float inv = 1.f / s;
  for (int d = tid; d < D; d += NUM_THREADS) {
    float acc = 0.f;
    for (int p = 0; p < n_parts; ++p) acc = fmaf(w_s[p], part_out[(base + p) * D + d], acc);
    out[((size_t)seq * num_heads + head) * D + d] = from_float<T>(acc * inv);
  }
}

}  // namespace upa
