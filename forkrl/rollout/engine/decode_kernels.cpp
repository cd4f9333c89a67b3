// The CPU decode step's small operations, each fused into one pass over its data (kernels.py builds
// this file; runner.py and engine.py call it, and fall back to PyTorch ops computing the same thing).
//
// Why: at decode batch 32 a step of the 135M model is ~15 ms of matmuls and, in PyTorch ops, ~18 ms
// of everything else: per-op dispatch on tensors of a few thousand elements, intermediate copies,
// the attention as a batched GEMM of tiny (group x d) x (d x T) products that streams the float32
// cache at ~14 GB/s, and eight passes over the [rows, vocabulary] logits to sample one token.
// With these kernels the rest takes ~5 ms (runner.py's docstring has the measurements).
//
//   decode_attention  rotary embedding, key/value cache write and grouped-query attention of one
//                     new token per row, reading every cached key and value once for all the
//                     query heads that share it (prefetched ahead); keys several rows share (a
//                     prompt, a header, a tree prefix) come from one slot, its rows back to back
//   add_rms_norm      residual add and RMSNorm, cast to the matmul dtype
//   silu_mul          SwiGLU's silu(gate) * up
//   sample_rows       softmax, entropy, log-prob and an inverse-CDF draw, two passes over the logits
//
// Arithmetic is float32 (float64 where the PyTorch path uses it) in the PyTorch path's formulas;
// only summation order and the vectorizable exp below differ (relative error < 2e-7). The cache
// may be bf16 (runner.py chooses it with bf16 weights); the PyTorch path's is float32.
#include <torch/extension.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxGroup = 16;  // query heads per kv head
constexpr int kAhead = 16;      // cache rows prefetched ahead of the one being read

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* dst, float x) { *dst = x; }
inline void store(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }

// exp(x) as 2^n * p(r), |r| <= ln2 / 2, degree-7 Taylor polynomial: relative error below 2e-7
// (float32 rounding) on [-87, 88], 0 below (as for -inf), and, unlike libm's expf, it vectorizes
inline float fast_exp(float x) {
  const bool underflow = x < -87.f;
  x = underflow ? -87.f : (x > 88.f ? 88.f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return underflow ? 0.f : p * scale;
}

// head vector j of row b: its projection plus bias, rotated (Hugging Face's rotate_half convention)
template <typename T, int D>
inline void load_head(const T* qkv, const float* bias, const float* cos, const float* sin, int64_t j,
                      bool rotate, float* out) {
  float raw[D];
  for (int i = 0; i < D; ++i) raw[i] = to_float(qkv[j * D + i]) + (bias ? bias[j * D + i] : 0.f);
  if (!rotate) {
    for (int i = 0; i < D; ++i) out[i] = raw[i];
    return;
  }
  constexpr int half = D / 2;
  for (int i = 0; i < half; ++i) out[i] = raw[i] * cos[i] - raw[i + half] * sin[i];
  for (int i = half; i < D; ++i) out[i] = raw[i] * cos[i] + raw[i - half] * sin[i];
}

inline void softmax_rows(float* scores, int64_t group, int64_t n, float* inv) {
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * n;
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) top = std::max(top, sg[t]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = fast_exp(sg[t] - top);
      total += sg[t];
    }
    inv[g] = 1.f / total;
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// out[g] = softmax(q[g] . K[0..n)) V[0..n) for G query heads of one row and kv head, keys
// [ends[s-1], ends[s]) read from segment s's cache (Ks[s], Vs[s]; n = ends[segs - 1]). Each key and
// value vector is loaded (and converted from bf16) once for the G queries, which stay in registers;
// the first pass streams the keys from memory with prefetching. A key's dot product is D/16 fused
// multiply-adds and one horizontal sum.
template <typename C, int D, int G>
inline void attend_group(const float (*q)[D], const C* const* Ks, const C* const* Vs, const int64_t* ends,
                         int64_t segs, int64_t s_pos, float* scores, float (*out)[D]) {
  constexpr int W = D / 16;
  constexpr int line = 64 / sizeof(C);
  const int64_t n = ends[segs - 1];
  __m512 qv[G][W];
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < W; ++w) qv[g][w] = _mm512_loadu_ps(q[g] + 16 * w);
  for (int64_t s = 0, t = 0; s < segs; ++s) {
    const C* K = Ks[s];
    const C* V = Vs[s];
    for (; t < ends[s]; ++t) {
      const C* k = K + t * s_pos;
      for (int c = 0; c < D; c += line) {
        __builtin_prefetch(k + kAhead * s_pos + c);
        __builtin_prefetch(V + t * s_pos + c);
      }
      __m512 kw[W];
      for (int w = 0; w < W; ++w) kw[w] = load16(k + 16 * w);
      for (int g = 0; g < G; ++g) {
        __m512 dot = _mm512_mul_ps(qv[g][0], kw[0]);
        for (int w = 1; w < W; ++w) dot = _mm512_fmadd_ps(qv[g][w], kw[w], dot);
        scores[g * n + t] = _mm512_reduce_add_ps(dot);
      }
    }
  }
  float inv[kMaxGroup];
  softmax_rows(scores, G, n, inv);
  __m512 acc[G][W];
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < W; ++w) acc[g][w] = _mm512_setzero_ps();
  for (int64_t s = 0, t = 0; s < segs; ++s) {
    const C* V = Vs[s];
    for (; t < ends[s]; ++t) {
      __m512 vw[W];
      for (int w = 0; w < W; ++w) vw[w] = load16(V + t * s_pos + 16 * w);
      for (int g = 0; g < G; ++g) {
        const __m512 pt = _mm512_set1_ps(scores[g * n + t]);
        for (int w = 0; w < W; ++w) acc[g][w] = _mm512_fmadd_ps(pt, vw[w], acc[g][w]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 scale = _mm512_set1_ps(inv[g]);
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(out[g] + 16 * w, _mm512_mul_ps(acc[g][w], scale));
  }
}

// the query heads of one kv head in chunks of up to 4 (what registers hold: all of them for
// SmolLM2, Llama 3 and Qwen3's small models), each chunk an independent attention
template <typename C, int D>
inline void attend(const float (*q)[D], int64_t group, const C* const* Ks, const C* const* Vs,
                   const int64_t* ends, int64_t segs, int64_t s_pos, float* scores, float (*out)[D]) {
  const int64_t n = ends[segs - 1];
  for (int64_t g = 0; g < group; g += 4) {
    const float(*qg)[D] = q + g;
    float* sg = scores + g * n;
    float(*og)[D] = out + g;
    switch (std::min<int64_t>(group - g, 4)) {
      case 1: attend_group<C, D, 1>(qg, Ks, Vs, ends, segs, s_pos, sg, og); break;
      case 2: attend_group<C, D, 2>(qg, Ks, Vs, ends, segs, s_pos, sg, og); break;
      case 3: attend_group<C, D, 3>(qg, Ks, Vs, ends, segs, s_pos, sg, og); break;
      default: attend_group<C, D, 4>(qg, Ks, Vs, ends, segs, s_pos, sg, og); break;
    }
  }
}
#else
// out[g] = softmax(q[g] . K[0..n)) V[0..n), for one row and kv head, keys [ends[s-1], ends[s]) read
// from segment s's cache; loops the compiler vectorizes
template <typename C, int D>
inline void attend(const float (*q)[D], int64_t group, const C* const* Ks, const C* const* Vs, const int64_t* ends,
                   int64_t segs, int64_t s_pos, float* scores, float (*out)[D]) {
  const int64_t n = ends[segs - 1];
  for (int64_t s = 0, t = 0; s < segs; ++s) {
    for (; t < ends[s]; ++t) {
      const C* k = Ks[s] + t * s_pos;
      for (int64_t g = 0; g < group; ++g) {
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < D; ++i) dot += q[g][i] * to_float(k[i]);
        scores[g * n + t] = dot;
      }
    }
  }
  float inv[kMaxGroup];
  softmax_rows(scores, group, n, inv);
  for (int64_t g = 0; g < group; ++g) {
    float acc[D] = {};
    for (int64_t s = 0, t = 0; s < segs; ++s) {
      for (; t < ends[s]; ++t) {
        const C* v = Vs[s] + t * s_pos;
        const float p = scores[g * n + t];
#pragma omp simd
        for (int i = 0; i < D; ++i) acc[i] += p * to_float(v[i]);
      }
    }
    for (int i = 0; i < D; ++i) out[g][i] = acc[i] * inv[g];
  }
}
#endif

// T: the projections' dtype (and the output's), C: the cache's. Rows are taken in `order` (all of
// a row's kv heads in turn), so rows that read one shared prefix run back to back and find it in
// the cache. Row b's keys [seg_end[b][s-1], seg_end[b][s]) come from slot seg_slot[b][s]: leading
// segments are other slots holding the same prefix, the last is b's own slot up to pos[b].
template <typename T, typename C, int D>
void decode(const T* qkv, const float* bias, const float* cos, const float* sin, const int64_t* pos,
            const int64_t* order, const int64_t* seg_slot, const int64_t* seg_end, int64_t max_segs,
            C* K, C* V, T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t s_slot,
            int64_t s_head, int64_t s_pos) {
  const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<const C*> Ks(max_segs + 1), Vs(max_segs + 1);
    std::vector<int64_t> ends(max_segs + 1);
    float q[kMaxGroup][D], att[kMaxGroup][D], kv[D];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = order ? order[item / kv_heads] : item / kv_heads, h = item % kv_heads;
      const T* row = qkv + b * width * D;
      const float *c = cos + b * D, *s = sin + b * D;
      C* Kh = K + b * s_slot + h * s_head;
      C* Vh = V + b * s_slot + h * s_head;
      load_head<T, D>(row, bias, c, s, heads + h, true, kv);
      for (int i = 0; i < D; ++i) store(Kh + pos[b] * s_pos + i, kv[i]);
      load_head<T, D>(row, bias, c, s, heads + kv_heads + h, false, kv);
      for (int i = 0; i < D; ++i) store(Vh + pos[b] * s_pos + i, kv[i]);
      for (int64_t g = 0; g < group; ++g) load_head<T, D>(row, bias, c, s, h * group + g, true, q[g]);
      int64_t segs = 0;
      for (int64_t k = 0; seg_slot && k < max_segs && seg_slot[b * max_segs + k] >= 0; ++k, ++segs) {
        const int64_t other = seg_slot[b * max_segs + k];
        Ks[segs] = K + other * s_slot + h * s_head;
        Vs[segs] = V + other * s_slot + h * s_head;
        ends[segs] = seg_end[b * max_segs + k];
      }
      Ks[segs] = Kh;
      Vs[segs] = Vh;
      ends[segs++] = pos[b] + 1;
      scores.resize(group * (pos[b] + 1));
      attend<C, D>(q, group, Ks.data(), Vs.data(), ends.data(), segs, s_pos, scores.data(), att);
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + b * heads * D + (h * group + g) * D;
        for (int i = 0; i < D; ++i) store(o + i, att[g][i]);
      }
    }
  });
}

template <typename T, typename C>
void dispatch_dim(int64_t d, const T* qkv, const float* bias, const float* cos, const float* sin,
                  const int64_t* pos, const int64_t* order, const int64_t* seg_slot, const int64_t* seg_end,
                  int64_t max_segs, C* K, C* V, T* out, int64_t rows, int64_t heads,
                  int64_t kv_heads, int64_t s_slot, int64_t s_head, int64_t s_pos) {
  switch (d) {
#define FORKRL_DIM(DIM) \
  case DIM: return decode<T, C, DIM>(qkv, bias, cos, sin, pos, order, seg_slot, seg_end, max_segs, K, V, out, rows, \
                                     heads, kv_heads, s_slot, s_head, s_pos);
    FORKRL_DIM(16) FORKRL_DIM(32) FORKRL_DIM(64) FORKRL_DIM(128)
#undef FORKRL_DIM
    default: TORCH_CHECK(false, "decode_attention: head_dim ", d, " is not one of 16, 32, 64, 128");
  }
}

template <typename T>
void add_rms_norm_rows(float* x, const T* delta, const float* weight, float eps, T* out, int64_t rows, int64_t dim) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = x + r * dim;
      if (delta) {
        const T* dr = delta + r * dim;
        for (int64_t i = 0; i < dim; ++i) xr[i] += to_float(dr[i]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < dim; ++i) squares += xr[i] * xr[i];
      const float scale = 1.f / std::sqrt(squares / float(dim) + eps);
      T* o = out + r * dim;
      for (int64_t i = 0; i < dim; ++i) store(o + i, xr[i] * scale * weight[i]);
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t inner) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * inner;
      const T* u = g + inner;
      T* o = out + r * inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float gi = to_float(g[i]);
        store(o + i, gi / (1.f + fast_exp(-gi)) * to_float(u[i]));
      }
    }
  });
}

constexpr int64_t kBlock = 256;  // vocabulary entries per block of the two-level draw (engine._BLOCK)

// row b: z = logits / t, p = exp(z - max z); entropy, log-prob of the drawn token, and the draw: the
// first token whose cumulative mass reaches u * sum(p), found block by block (engine._inverse_cdf)
void sample_rows(const float* logits, const float* temperature, const double* u, int64_t* tokens, float* logp,
                 float* entropy, int64_t rows, int64_t vocab) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cdf(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* l = logits + r * vocab;
      const float t = temperature[r];
      float top = -INFINITY;
      for (int64_t i = 0; i < vocab; ++i) top = std::max(top, l[i]);
      top /= t;  // division by t > 0 is monotone, so max(l / t) = max(l) / t
      double running = 0.0, weighted = 0.0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t lo = blk * kBlock, hi = std::min(vocab, lo + kBlock);
        float mass = 0.f, moment = 0.f;
#pragma omp simd reduction(+ : mass, moment)
        for (int64_t i = lo; i < hi; ++i) {
          const float shifted = l[i] / t - top;
          const float p = fast_exp(shifted);
          mass += p;
          moment += p > 0.f ? p * shifted : 0.f;  // a -inf logit adds nothing, not 0 * -inf
        }
        running += mass;
        weighted += moment;
        cdf[blk] = running;
      }
      const double log_total = std::log(running);
      entropy[r] = float(log_total - weighted / running);
      const double target = u[r] * running;
      int64_t blk = std::lower_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
      blk = std::min(blk, blocks - 1);
      const double before = blk > 0 ? cdf[blk - 1] : 0.0;
      const int64_t lo = blk * kBlock, hi = std::min(vocab, lo + kBlock);
      const double rest = std::min(target - before, cdf[blk] - before);
      double within = 0.0;
      int64_t token = hi - 1;
      for (int64_t i = lo; i < hi; ++i) {
        within += fast_exp(l[i] / t - top);
        if (within >= rest) {
          token = i;
          break;
        }
      }
      tokens[r] = token;
      logp[r] = float(double(l[token] / t - top) - log_total);
    }
  });
}

// calls f with a value of the C++ type of `type` (float32 or bfloat16), so f can name it as decltype
template <typename F>
void with_float_type(at::ScalarType type, const char* what, F&& f) {
  if (type == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(type == at::kFloat, what, ": float32 or bfloat16 expected");
    f(float{});
  }
}

}  // namespace

// qkv [rows, (heads + 2 kv_heads) * d] (float32 or bfloat16; the fused q/k/v projection of one new
// token per row), bias: float32 [(heads + 2 kv_heads) * d] or None, cos/sin [rows, d] float32,
// pos [rows] int64: the new token's position (row b is cache slot b). K/V: one layer's cache
// [slots, kv_heads, capacity, d], float32 or bfloat16. Writes the new keys and values at pos,
// returns the attention output [rows, heads * d] in qkv's dtype.
// Shared prefixes (optional): seg_slot/seg_end [rows, S] int64 name, per row, the slots its leading
// keys are read from, each up to seg_end (increasing, below pos), then -1 padding; the row's own slot
// serves the rest. A slot named there must hold the same tokens' states at those positions. `order`
// [rows]: the order rows are attended in.
torch::Tensor decode_attention(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& bias,
                               const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& pos,
                               torch::Tensor& K, torch::Tensor& V, int64_t heads,
                               const c10::optional<torch::Tensor>& seg_slot,
                               const c10::optional<torch::Tensor>& seg_end,
                               const c10::optional<torch::Tensor>& order) {
  const int64_t rows = qkv.size(0), kv_heads = K.size(1), d = K.size(3);
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * d, "decode_attention: qkv shape");
  TORCH_CHECK(V.scalar_type() == K.scalar_type() && V.strides() == K.strides() && K.stride(3) == 1 &&
              K.size(0) >= rows, "decode_attention: cache layout");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup, "decode_attention: head grouping");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && pos.is_contiguous() && pos.scalar_type() == at::kLong,
              "decode_attention: cos/sin/pos layout");
  TORCH_CHECK(pos.numel() == rows && cos.numel() == rows * d && sin.numel() == rows * d,
              "decode_attention: one position, cos and sin row per row");
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(p[r] >= 0 && p[r] < K.size(2), "decode_attention: position ", p[r], " outside the cache");
  const int64_t *ss = nullptr, *se = nullptr, *ord = nullptr;
  int64_t max_segs = 0;
  if (seg_slot.has_value() && seg_slot->defined()) {
    TORCH_CHECK(seg_end.has_value() && seg_end->defined() && seg_slot->is_contiguous() && seg_end->is_contiguous() &&
                seg_slot->scalar_type() == at::kLong && seg_end->scalar_type() == at::kLong &&
                seg_slot->dim() == 2 && seg_slot->size(0) == rows && seg_end->sizes() == seg_slot->sizes(),
                "decode_attention: seg_slot and seg_end must be contiguous int64 [rows, S]");
    ss = seg_slot->data_ptr<int64_t>();
    se = seg_end->data_ptr<int64_t>();
    max_segs = seg_slot->size(1);
    for (int64_t r = 0; r < rows; ++r) {
      int64_t last = 0;
      for (int64_t k = 0; k < max_segs && ss[r * max_segs + k] >= 0; ++k) {
        const int64_t e = se[r * max_segs + k];
        TORCH_CHECK(ss[r * max_segs + k] < K.size(0) && e > last && e <= p[r],
                    "decode_attention: row ", r, "'s shared segments must name cache slots and end in order before its position");
        last = e;
      }
    }
  }
  if (order.has_value() && order->defined()) {
    TORCH_CHECK(order->is_contiguous() && order->scalar_type() == at::kLong && order->numel() == rows,
                "decode_attention: order must be contiguous int64 [rows]");
    ord = order->data_ptr<int64_t>();
    std::vector<bool> seen(rows, false);
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(ord[r] >= 0 && ord[r] < rows && !seen[ord[r]], "decode_attention: order must permute the rows");
      seen[ord[r]] = true;
    }
  }
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat, "decode_attention: bias");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({rows, heads * d}, qkv.options());
  with_float_type(qkv.scalar_type(), "decode_attention: qkv", [&](auto qkv_type) {
    with_float_type(K.scalar_type(), "decode_attention: cache", [&](auto cache_type) {
      using T = decltype(qkv_type);
      using C = decltype(cache_type);
      dispatch_dim<T, C>(d, qkv.data_ptr<T>(), b, cos.data_ptr<float>(), sin.data_ptr<float>(), p, ord, ss, se,
                         max_segs, K.data_ptr<C>(), V.data_ptr<C>(), out.data_ptr<T>(), rows, heads, kv_heads,
                         K.stride(0), K.stride(1), K.stride(2));
    });
  });
  return out;
}

// x [rows, dim] float32, updated in place to x + delta (delta: [rows, dim] in the output dtype, or
// None); returns RMSNorm(x) * weight [rows, dim] in `dtype` (float32 or bfloat16)
torch::Tensor add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& weight,
                           double eps, at::ScalarType dtype) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && weight.is_contiguous() &&
              weight.scalar_type() == at::kFloat, "add_rms_norm: x and weight must be contiguous float32");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  auto out = torch::empty(x.sizes(), x.options().dtype(dtype));
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta)
    TORCH_CHECK(delta->is_contiguous() && delta->scalar_type() == dtype && delta->numel() == x.numel(),
                "add_rms_norm: delta must be contiguous, x's shape, in the output dtype");
  with_float_type(dtype, "add_rms_norm: dtype", [&](auto type) {
    using T = decltype(type);
    add_rms_norm_rows<T>(x.data_ptr<float>(), has_delta ? delta->data_ptr<T>() : nullptr, weight.data_ptr<float>(),
                         float(eps), out.data_ptr<T>(), rows, dim);
  });
  return out;
}

// gate_up [..., 2 inner] -> silu(gate) * up [..., inner], same dtype (float32 or bfloat16)
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0, "silu_mul: contiguous [..., 2 * inner]");
  const int64_t inner = gate_up.size(-1) / 2, rows = gate_up.numel() / gate_up.size(-1);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inner;
  auto out = torch::empty(sizes, gate_up.options());
  with_float_type(gate_up.scalar_type(), "silu_mul", [&](auto type) {
    using T = decltype(type);
    silu_mul_rows<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), rows, inner);
  });
  return out;
}

// logits [rows, vocab] float32, temperature [rows] float32 > 0, u [rows] float64 in (0, 1]
// -> (tokens int64, log-probs float32, entropies float32), all under softmax(logits / temperature)
std::vector<torch::Tensor> sample(const torch::Tensor& logits, const torch::Tensor& temperature,
                                  const torch::Tensor& u) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat, "sample: logits");
  TORCH_CHECK(temperature.is_contiguous() && temperature.scalar_type() == at::kFloat && u.is_contiguous() &&
              u.scalar_type() == at::kDouble && temperature.numel() == logits.size(0) && u.numel() == logits.size(0),
              "sample: temperature float32 [rows], u float64 [rows]");
  const int64_t rows = logits.size(0);
  auto tokens = torch::empty({rows}, logits.options().dtype(at::kLong));
  auto logp = torch::empty({rows}, logits.options());
  auto entropy = torch::empty({rows}, logits.options());
  sample_rows(logits.data_ptr<float>(), temperature.data_ptr<float>(), u.data_ptr<double>(), tokens.data_ptr<int64_t>(),
              logp.data_ptr<float>(), entropy.data_ptr<float>(), rows, logits.size(1));
  return {tokens, logp, entropy};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "rotary + cache write + attention for one decode token per row",
        py::arg("qkv"), py::arg("bias"), py::arg("cos"), py::arg("sin"), py::arg("pos"), py::arg("K"), py::arg("V"),
        py::arg("heads"), py::arg("seg_slot") = py::none(), py::arg("seg_end") = py::none(),
        py::arg("order") = py::none());
  m.def("add_rms_norm", &add_rms_norm, "x += delta; RMSNorm(x) * weight in dtype");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("sample", &sample, "softmax, entropy, log-prob and inverse-CDF draw per row");
}
