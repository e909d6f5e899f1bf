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


// ============================================================================================
// v3: the grouped-query decode kernel on the matrix units (mma.sync m16n8k16, fp32 accumulate).
//
//   * one thread block per (KV head, tile of up to 8 query heads that share it, sequence,
//     partition): the block reads each K/V element once for all its query heads;
//   * each warp takes chunks of 16 tokens of the partition (warp w: chunks w, w + 4, ...) and
//     keeps an online softmax (running max and sum per head) and its output in registers;
//   * S = Q K^T with Q as the 16-row A operand (rows 8-15 are zero), K^T as B (8 tokens per
//     n-tile); then O^T += V^T P^T with V^T as A (16 head-dim rows) and P^T as B (8 heads), so
//     the accumulators hold only the tile's 8 heads, and the probabilities go from S's
//     accumulator registers to PV's B operand without a shuffle;
//   * both products sum over an index whose order is free: thread j of a quad takes head-dim
//     elements 32p + 8j .. 8j+7 (one 16-byte key vector) and tokens 4j .. 4j+3 (one 8-byte value
//     vector), and Q and P are laid out to match, so every load is a whole vector;
//   * K and V loads of the warp's next chunk are issued as soon as this chunk's have been used
//     (K after Q K^T, V after P V), so each warp keeps one chunk of loads in flight; the block
//     table entries of a chunk are read two steps ahead, so a lookup never delays its loads;
//   * the warps of a block merge in shared memory in a fixed order; a single partition writes
//     the output, several write normalised partials that paged_attention_reduce merges.
// Addressing is the same compile-time switch as v1/v2 (physical_block<ADDR>), so the paged,
// contiguous and no_offset instantiations differ only in how a block address is computed.
// Partitions are multiples of 16 tokens; block sizes 1-256; head sizes multiples of 16.

constexpr int MMA_HEADS = 8;     // query heads per thread block (PV's n dimension)
constexpr int MMA_CHUNK = 16;    // tokens per warp step (PV's k dimension)

template <typename T> struct MmaType;
template <> struct MmaType<__half> {
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
};
template <> struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
};

// d[0..3] += A(16x16, row) * B(16x8, col) with fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float* d, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, unsigned a0, unsigned a1, unsigned a2,
                                                 unsigned a3, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, unsigned a0, unsigned a1,
                                                        unsigned a2, unsigned a3, unsigned b0,
                                                        unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Token (0..15) of a chunk that S's n-tile `nt`, column `n` stands for: thread j of a quad then
// holds tokens 4j .. 4j+3 in both S's accumulators and PV's operands.
__device__ __forceinline__ int mma_token(int nt, int n) { return 4 * (n / 2) + 2 * nt + (n % 2); }

// Physical blocks one thread needs for a chunk: its two key tokens and its four value tokens.
template <int BS>
struct ChunkBlocks {
  static constexpr int NV = BS >= 4 ? 1 : 4 / BS;  // value tokens 4j..4j+3 span NV blocks
  int k[2];
  int v[NV];
};

// physical_block for the matrix-unit kernel: NO_OFFSET's zero is opaque to the optimiser, so it
// cannot hoist the (then loop-invariant) addresses into extra registers and the no_offset
// instantiation compiles like the paged one.
template <int ADDR>
__device__ __forceinline__ int mma_block(const int* __restrict__ table_row, int first, int logical) {
  if (ADDR != NO_OFFSET) return physical_block<ADDR>(table_row, first, logical);
  int zero;
  asm volatile("mov.b32 %0, 0;" : "=r"(zero));
  return zero;
}

template <int ADDR, int BS>
__device__ __forceinline__ ChunkBlocks<BS> chunk_blocks(const int* __restrict__ table_row,
                                                        int first, int c0, int end, int lane) {
  ChunkBlocks<BS> b;
  const int j = lane % 4, n = lane / 4;
  if constexpr (BS >= MMA_CHUNK) {  // the whole chunk lies in one block: one (warp-uniform) lookup
    const int p = mma_block<ADDR>(table_row, first, c0 / BS);
    b.k[0] = b.k[1] = p;
    b.v[0] = p;
  } else {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int t = c0 + mma_token(nt, n);
      b.k[nt] = t < end ? mma_block<ADDR>(table_row, first, t / BS) : 0;
    }
#pragma unroll
    for (int i = 0; i < ChunkBlocks<BS>::NV; ++i) {
      const int t = c0 + 4 * j + i * (BS >= 4 ? 4 : BS);
      b.v[i] = t < end ? mma_block<ADDR>(table_row, first, t / BS) : 0;
    }
  }
  return b;
}

template <typename T, int BS, int D>
struct ChunkRegs {
  static constexpr int KP = D / 32;           // 16-byte key vectors per token and thread
  static constexpr int KR = (D % 32) ? 1 : 0; // an 8-byte remainder (head sizes 80, 112)
  static constexpr int MT = D / 16;           // 16-row tiles of the head dimension
  uint4 k[2][KP > 0 ? KP : 1];
  uint2 kr[2];
  uint2 v[MT][2];                             // rows d0 and d0 + 8 of each tile
};

// Issue the loads of the key vectors of one chunk (tokens >= end give zeros).
template <typename T, int BS, int D>
__device__ __forceinline__ void load_keys(ChunkRegs<T, BS, D>& r, const T* __restrict__ k_cache,
                                          const ChunkBlocks<BS>& b, int kvh, int num_kv_heads,
                                          int c0, int end, int lane) {
  constexpr int X = 16 / sizeof(T);
  const int j = lane % 4, n = lane / 4;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int t = c0 + mma_token(nt, n);
    const bool ok = t < end;
    const T* base = k_cache + ((size_t)b.k[nt] * num_kv_heads + kvh) * (size_t)D * BS + (t % BS) * X;
#pragma unroll
    for (int p = 0; p < ChunkRegs<T, BS, D>::KP; ++p) {
      const int e = 32 * p + 8 * j;  // first element: one whole x-vector of the classic layout
      r.k[nt][p] = ok ? __ldg(reinterpret_cast<const uint4*>(base + (e / X) * BS * X))
                      : make_uint4(0, 0, 0, 0);
    }
    if (ChunkRegs<T, BS, D>::KR) {
      const int e = 32 * ChunkRegs<T, BS, D>::KP + 4 * j;
      r.kr[nt] = ok ? __ldg(reinterpret_cast<const uint2*>(base + (e / X) * BS * X + e % X))
                    : make_uint2(0, 0);
    }
  }
}

// Issue the loads of the value vectors of one chunk: tokens 4j..4j+3 of head-dim rows
// d0 = 16 mt + n and d0 + 8 (tokens >= end give zeros: the cache may hold NaN there).
template <typename T, int BS, int D>
__device__ __forceinline__ void load_values(ChunkRegs<T, BS, D>& r, const T* __restrict__ v_cache,
                                            const ChunkBlocks<BS>& b, int kvh, int num_kv_heads,
                                            int c0, int end, int lane) {
  const int j = lane % 4, n = lane / 4;
  const int t0 = c0 + 4 * j;
  const bool full = t0 + 3 < end;
#pragma unroll
  for (int mt = 0; mt < ChunkRegs<T, BS, D>::MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int d = 16 * mt + n + 8 * h;
      if (BS >= 4) {
        const T* p = v_cache + (((size_t)b.v[0] * num_kv_heads + kvh) * D + d) * BS + t0 % BS;
        if (full) {
          r.v[mt][h] = __ldg(reinterpret_cast<const uint2*>(p));
        } else {
          unsigned short e[4];
#pragma unroll
          for (int i = 0; i < 4; ++i)
            e[i] = t0 + i < end ? __ldg(reinterpret_cast<const unsigned short*>(p) + i) : 0;
          r.v[mt][h] = make_uint2(e[0] | (unsigned)e[1] << 16, e[2] | (unsigned)e[3] << 16);
        }
      } else {
        unsigned short e[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int t = t0 + i;
          const T* p = v_cache + (((size_t)b.v[i / BS] * num_kv_heads + kvh) * D + d) * BS + t % BS;
          e[i] = t < end ? __ldg(reinterpret_cast<const unsigned short*>(p)) : 0;
        }
        r.v[mt][h] = make_uint2(e[0] | (unsigned)e[1] << 16, e[2] | (unsigned)e[3] << 16);
      }
    }
  }
}

#ifndef UPA_MMA_MIN_BLOCKS
#define UPA_MMA_MIN_BLOCKS 1  // resident v3 blocks per SM to allocate registers for (head <= 128);
                              // 4 (128 registers) spills at head 128
#endif

template <typename T, int BS, int D, int ADDR, int HT>
__global__ void __launch_bounds__(NUM_THREADS, (D <= 128 ? UPA_MMA_MIN_BLOCKS : 1))
paged_attention_mma(T* __restrict__ out, float* __restrict__ part_out,
                    float* __restrict__ part_max, float* __restrict__ part_sum,
                    const T* __restrict__ q, const T* __restrict__ k_cache,
                    const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                    const int* __restrict__ seq_first, const int* __restrict__ seq_lens,
                    int num_heads, int num_kv_heads, int max_blocks, float scale,
                    int partition_size, int max_partitions, int write_final) {
  static_assert(sizeof(T) == 2, "the matrix-unit kernel takes fp16 or bf16");
  static_assert(D % 16 == 0, "head size must be a multiple of 16");
  static_assert(HT == MMA_HEADS || HT == 2 * MMA_HEADS, "a head tile is 8 or 16 query heads");
  using R = ChunkRegs<T, BS, D>;
  constexpr int NH = HT / MMA_HEADS;  // 8-head halves: S's rows g (half 0) and g + 8 (half 1)
  constexpr float LOG2E = 1.4426950408889634f;
  constexpr float LN2 = 0.6931471805599453f;

  constexpr bool Q_IN_REGS = D <= 128;
  constexpr int Q_ROW = D + 32;                     // elements per padded row of q_s
  extern __shared__ float smem[];
  float* out_s = smem;                              // [HT][D]
  float* max_s = out_s + HT * D;                    // [NUM_WARPS][HT]
  float* sum_s = max_s + NUM_WARPS * HT;            // [NUM_WARPS][HT]

  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int j = lane % 4, g = lane / 4;             // quad lane; this thread's heads g (+8) in S
  T* q_s = reinterpret_cast<T*>(sum_s + NUM_WARPS * HT) + warp * HT * Q_ROW;
  const int group = num_heads / num_kv_heads;
  const int tiles = (group + HT - 1) / HT;
  const int kvh = blockIdx.x / tiles;
  const int tile0 = (blockIdx.x % tiles) * HT;
  const int rows = min(HT, group - tile0);  // heads of this tile (the rest are padding)
  const int head0 = kvh * group + tile0;
  const int seq = blockIdx.y, part = blockIdx.z;

  const int seq_len = seq_lens[seq];
  const int part_start = part * partition_size;
  if (part_start >= seq_len) return;
  const int end = min(seq_len, part_start + partition_size);
  const int* table_row = block_tables + (size_t)seq * max_blocks;
  const int first = seq_first[seq];

  // Q as the A operand: row g (and g + 8 in a 16-head tile) = this thread's heads, k positions
  // matching the key vectors. Up to head size 128 it stays in registers; above, in shared memory
  // (rows padded by 64 bytes so a quarter-warp's 16-byte reads hit distinct banks), which keeps
  // head size 256 from spilling.
  uint4 qa[NH][Q_IN_REGS ? (R::KP > 0 ? R::KP : 1) : 1];
  uint2 qr[NH];
#pragma unroll
  for (int hh = 0; hh < NH; ++hh) {
    const int hq = g + MMA_HEADS * hh;
    const T* qh = q + ((size_t)seq * num_heads + head0 + hq) * D;
    const bool ok = hq < rows;
#pragma unroll
    for (int p = 0; p < R::KP; ++p) {
      const uint4 x = ok ? __ldg(reinterpret_cast<const uint4*>(qh + 32 * p + 8 * j))
                         : make_uint4(0, 0, 0, 0);
      if (Q_IN_REGS) qa[hh][Q_IN_REGS ? p : 0] = x;
      else *reinterpret_cast<uint4*>(q_s + hq * Q_ROW + 32 * p + 8 * j) = x;
    }
    qr[hh] = (R::KR && ok) ? __ldg(reinterpret_cast<const uint2*>(qh + 32 * R::KP + 4 * j))
                           : make_uint2(0, 0);
  }
  if (!Q_IN_REGS) __syncwarp();  // each warp wrote, and reads, the whole tile itself
  const float qk_scale = scale * LOG2E;  // logits in base-2 units: p = exp2(s - m)

  float acc[NH][R::MT][4];  // O^T per half: rows d = 16 mt + g (+8), columns heads 2j, 2j+1
#pragma unroll
  for (int hh = 0; hh < NH; ++hh)
#pragma unroll
    for (int mt = 0; mt < R::MT; ++mt)
      acc[hh][mt][0] = acc[hh][mt][1] = acc[hh][mt][2] = acc[hh][mt][3] = 0.f;
  float run_max[NH], run_sum[NH];  // of heads g (+8) (base 2)
#pragma unroll
  for (int hh = 0; hh < NH; ++hh) run_max[hh] = NEG_INF(), run_sum[hh] = 0.f;

  int c0 = part_start + warp * MMA_CHUNK;
  constexpr int STEP = NUM_WARPS * MMA_CHUNK;  // tokens between a warp's chunks
  R r;
  // Physical blocks of the warp's next chunk (nxt) and of the one after (nn): a chunk's table
  // entries are read a whole step before its K/V loads need them, so the page-table read is not
  // on the load chain (read one step ahead, it cost paged v3 up to 13% over contiguous).
  ChunkBlocks<BS> nxt, nn;
  if (c0 < end) {
    const ChunkBlocks<BS> blk = chunk_blocks<ADDR, BS>(table_row, first, c0, end, lane);
    load_keys<T, BS, D>(r, k_cache, blk, kvh, num_kv_heads, c0, end, lane);
    load_values<T, BS, D>(r, v_cache, blk, kvh, num_kv_heads, c0, end, lane);
    if (c0 + STEP < end) nxt = chunk_blocks<ADDR, BS>(table_row, first, c0 + STEP, end, lane);
  }
  for (; c0 < end; c0 += STEP) {
    const int c1 = c0 + STEP;  // this warp's next chunk
    if (c1 + STEP < end) nn = chunk_blocks<ADDR, BS>(table_row, first, c1 + STEP, end, lane);

    // ---- S = Q K^T (two n-tiles of 8 tokens; rows 8-15 are the second half's heads, or zero) ----
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int p = 0; p < R::KP; ++p) {
        uint4 a[NH];
#pragma unroll
        for (int hh = 0; hh < NH; ++hh)
          a[hh] = Q_IN_REGS ? qa[hh][Q_IN_REGS ? p : 0]
                            : *reinterpret_cast<const uint4*>(q_s + (g + MMA_HEADS * hh) * Q_ROW + 32 * p + 8 * j);
        const uint4 b = NH > 1 ? a[NH - 1] : make_uint4(0, 0, 0, 0);
        mma16816<T>(s[nt], a[0].x, b.x, a[0].y, b.y, r.k[nt][p].x, r.k[nt][p].y);
        mma16816<T>(s[nt], a[0].z, b.z, a[0].w, b.w, r.k[nt][p].z, r.k[nt][p].w);
      }
      if (R::KR) {
        const uint2 b = NH > 1 ? qr[NH - 1] : make_uint2(0, 0);
        mma16816<T>(s[nt], qr[0].x, b.x, qr[0].y, b.y, r.kr[nt].x, r.kr[nt].y);
      }
    }
    if (c1 < end) load_keys<T, BS, D>(r, k_cache, nxt, kvh, num_kv_heads, c1, end, lane);

    unsigned pb[NH][2];
#pragma unroll
    for (int hh = 0; hh < NH; ++hh) {
      // ---- online softmax of head g + 8 hh over tokens 4j..4j+3 ----
      float l[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = c0 + 4 * j + i;  // s[i / 2][2 hh + i % 2] is token 4j + i
        l[i] = t < end ? s[i / 2][2 * hh + i % 2] * qk_scale : NEG_INF();
      }
      float cmax = fmaxf(fmaxf(l[0], l[1]), fmaxf(l[2], l[3]));
      cmax = fmaxf(cmax, __shfl_xor_sync(FULL, cmax, 1));
      cmax = fmaxf(cmax, __shfl_xor_sync(FULL, cmax, 2));
      const float new_max = fmaxf(run_max[hh], cmax);
      const float alpha = exp2f(run_max[hh] - new_max);  // 0 on the first chunk (run_max = -inf)
      float pr[4], psum = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pr[i] = exp2f(l[i] - new_max);
        psum += pr[i];
      }
      psum += __shfl_xor_sync(FULL, psum, 1);
      psum += __shfl_xor_sync(FULL, psum, 2);
      run_sum[hh] = run_sum[hh] * alpha + psum;
      run_max[hh] = new_max;
      // The accumulators' columns are heads 2j and 2j+1 (of this half): take their factors
      // from those quads.
      const float a_lo = __shfl_sync(FULL, alpha, 8 * j);
      const float a_hi = __shfl_sync(FULL, alpha, 8 * j + 4);
#pragma unroll
      for (int mt = 0; mt < R::MT; ++mt) {
        acc[hh][mt][0] *= a_lo; acc[hh][mt][1] *= a_hi; acc[hh][mt][2] *= a_lo; acc[hh][mt][3] *= a_hi;
      }
      pb[hh][0] = MmaType<T>::pack(pr[0], pr[1]);  // P^T rows (tokens) 4j, 4j+1
      pb[hh][1] = MmaType<T>::pack(pr[2], pr[3]);  // tokens 4j+2, 4j+3
    }

    // ---- O^T += V^T P^T (one product per half, the same V operand) ----
#pragma unroll
    for (int mt = 0; mt < R::MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < NH; ++hh)
        mma16816<T>(acc[hh][mt], r.v[mt][0].x, r.v[mt][1].x, r.v[mt][0].y, r.v[mt][1].y,
                    pb[hh][0], pb[hh][1]);
    if (c1 < end) load_values<T, BS, D>(r, v_cache, nxt, kvh, num_kv_heads, c1, end, lane);
    nxt = nn;
  }

  // ---- merge the warps (fixed order) ----
  if (j == 0) {
#pragma unroll
    for (int hh = 0; hh < NH; ++hh) {
      max_s[warp * HT + g + MMA_HEADS * hh] = run_max[hh];
      sum_s[warp * HT + g + MMA_HEADS * hh] = run_sum[hh];
    }
  }
  __syncthreads();
  float my_w[NH][2], tot_max[NH][2], tot_sum[NH][2];  // for heads 8 hh + 2j, 8 hh + 2j + 1
#pragma unroll
  for (int hh = 0; hh < NH; ++hh)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int h = MMA_HEADS * hh + 2 * j + c;
      float m = NEG_INF();
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) m = fmaxf(m, max_s[w * HT + h]);
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float mw = max_s[w * HT + h];
        sum += mw == NEG_INF() ? 0.f : sum_s[w * HT + h] * exp2f(mw - m);
      }
      const float mine = max_s[warp * HT + h];
      my_w[hh][c] = mine == NEG_INF() ? 0.f : exp2f(mine - m);
      tot_max[hh][c] = m;
      tot_sum[hh][c] = sum;
    }
#pragma unroll
  for (int w = 0; w < NUM_WARPS; ++w) {
    if (warp == w) {
#pragma unroll
      for (int hh = 0; hh < NH; ++hh)
#pragma unroll
        for (int mt = 0; mt < R::MT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int d = 16 * mt + g + 8 * (e / 2), h = MMA_HEADS * hh + 2 * j + (e % 2);
            float* o = out_s + h * D + d;
            const float x = acc[hh][mt][e] * my_w[hh][e % 2];
            *o = (w == 0) ? x : *o + x;
          }
    }
    __syncthreads();
  }
  if (!write_final && warp == 0 && g == 0) {  // lanes 0-3: heads 8 hh + 2j, 8 hh + 2j + 1
#pragma unroll
    for (int hh = 0; hh < NH; ++hh)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int h = MMA_HEADS * hh + 2 * j + c;
        if (h < rows) {
          const size_t idx = ((size_t)seq * num_heads + head0 + h) * max_partitions + part;
          part_max[idx] = tot_max[hh][c] * LN2;  // natural-log units, as v2's partials
          part_sum[idx] = tot_sum[hh][c];
        }
      }
  }
  // Every thread needs the sums of all heads for the write-out: recompute them from shared memory.
  for (int i = threadIdx.x; i < rows * D; i += NUM_THREADS) {
    const int h = i / D, d = i % D;
    float m = NEG_INF();
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) m = fmaxf(m, max_s[w * HT + h]);
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      const float mw = max_s[w * HT + h];
      sum += mw == NEG_INF() ? 0.f : sum_s[w * HT + h] * exp2f(mw - m);
    }
    const float o = out_s[h * D + d] / sum;
    if (write_final) {
      out[((size_t)seq * num_heads + head0 + h) * D + d] = from_float<T>(o);
    } else {
      part_out[(((size_t)seq * num_heads + head0 + h) * max_partitions + part) * D + d] = o;
    }
  }
}

}  // namespace upa
