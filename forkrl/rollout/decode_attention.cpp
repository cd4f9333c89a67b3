// One decode step's attention on the CPU, for LlamaRunner: rotary embedding, key/value cache write
// and grouped-query attention of one new token per row, fused into one pass over the cache.
//
// Why: at decode time the attention is a batch of tiny products (per row and kv head, `group` query
// vectors against T cached keys). torch.matmul runs them as a batched GEMM at ~30 GFLOP/s and
// streams the float32 cache at ~14 GB/s; this loop reads every cached key and value row once,
// prefetched a few rows ahead, and runs at ~2x that speed (bench numbers in runner.py's docstring).
// The arithmetic is the reference path's: float32 throughout, softmax with the row's maximum
// subtracted, the 1/sqrt(d) scale already folded into the query weights.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxGroup = 16;  // query heads per kv head
constexpr int kAhead = 8;      // cache rows prefetched ahead of the one being read

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* dst, float x) { *dst = x; }
inline void store(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }

inline void prefetch_row(const float* p, int n) {
  for (int c = 0; c < n; c += 16) __builtin_prefetch(p + c);
}

// exp(x) for x <= 0 as 2^n * p(r), |r| <= ln2 / 2, degree-7 Taylor polynomial: relative error
// below 2e-7 (float32 rounding), and, unlike libm's expf, it vectorizes
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
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
  return p * scale;
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

template <typename T, int D>
void decode(const T* qkv, const float* bias, const float* cos, const float* sin, const int64_t* pos,
            float* K, float* V, T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t s_slot,
            int64_t s_head, int64_t s_pos) {
  const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    float q[kMaxGroup][D], acc[kMaxGroup][D], inv[kMaxGroup];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads, n = pos[b] + 1;
      const T* row = qkv + b * width * D;
      const float *c = cos + b * D, *s = sin + b * D;
      float* Kh = K + b * s_slot + h * s_head;
      float* Vh = V + b * s_slot + h * s_head;
      load_head<T, D>(row, bias, c, s, heads + h, true, Kh + pos[b] * s_pos);
      load_head<T, D>(row, bias, c, s, heads + kv_heads + h, false, Vh + pos[b] * s_pos);
      for (int64_t g = 0; g < group; ++g) load_head<T, D>(row, bias, c, s, h * group + g, true, q[g]);

      scores.resize(group * n);
      for (int64_t t = 0; t < n; ++t) {
        const float* k = Kh + t * s_pos;
        prefetch_row(k + kAhead * s_pos, D);
        prefetch_row(Vh + t * s_pos, D);
        for (int64_t g = 0; g < group; ++g) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int i = 0; i < D; ++i) dot += q[g][i] * k[i];
          scores[g * n + t] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * n;
        float top = -INFINITY;
        for (int64_t t = 0; t < n; ++t) top = std::max(top, sg[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < n; ++t) {
          sg[t] = exp_nonpositive(sg[t] - top);
          total += sg[t];
        }
        inv[g] = 1.f / total;
        for (int i = 0; i < D; ++i) acc[g][i] = 0.f;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* v = Vh + t * s_pos;
        prefetch_row(v + kAhead * s_pos, D);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + t];
#pragma omp simd
          for (int i = 0; i < D; ++i) acc[g][i] += p * v[i];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + b * heads * D + (h * group + g) * D;
        for (int i = 0; i < D; ++i) store(o + i, acc[g][i] * inv[g]);
      }
    }
  });
}

template <typename T>
void dispatch_dim(int64_t d, const T* qkv, const float* bias, const float* cos, const float* sin,
                  const int64_t* pos, float* K, float* V, T* out, int64_t rows, int64_t heads,
                  int64_t kv_heads, int64_t s_slot, int64_t s_head, int64_t s_pos) {
  switch (d) {
#define FORKRL_DIM(DIM) \
  case DIM: return decode<T, DIM>(qkv, bias, cos, sin, pos, K, V, out, rows, heads, kv_heads, s_slot, s_head, s_pos);
    FORKRL_DIM(16) FORKRL_DIM(32) FORKRL_DIM(64) FORKRL_DIM(128)
#undef FORKRL_DIM
    default: TORCH_CHECK(false, "decode_attention: head_dim ", d, " is not one of 16, 32, 64, 128");
  }
}

}  // namespace

// qkv [rows, (heads + 2 kv_heads) * d] (float32 or bfloat16; the fused q/k/v projection of one new
// token per row), bias: float32 [(heads + 2 kv_heads) * d] or None, cos/sin [rows, d] float32,
// pos [rows] int64: the new token's position (row b is cache slot b). K/V: one layer's float32
// cache [slots, kv_heads, capacity, d]. Writes the new keys and values at pos, returns the attention
// output [rows, heads * d] in qkv's dtype.
torch::Tensor decode_attention(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& bias,
                               const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& pos,
                               torch::Tensor& K, torch::Tensor& V, int64_t heads) {
  const int64_t rows = qkv.size(0), kv_heads = K.size(1), d = K.size(3);
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * d, "decode_attention: qkv shape");
  TORCH_CHECK(K.scalar_type() == at::kFloat && V.strides() == K.strides() && K.stride(3) == 1 &&
              K.size(0) >= rows, "decode_attention: cache layout");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup, "decode_attention: head grouping");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && pos.is_contiguous() && pos.scalar_type() == at::kLong,
              "decode_attention: cos/sin/pos layout");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat, "decode_attention: bias");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({rows, heads * d}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) {
    dispatch_dim<c10::BFloat16>(d, qkv.data_ptr<c10::BFloat16>(), b, cos.data_ptr<float>(), sin.data_ptr<float>(),
                                pos.data_ptr<int64_t>(), K.data_ptr<float>(), V.data_ptr<float>(),
                                out.data_ptr<c10::BFloat16>(), rows, heads, kv_heads, K.stride(0), K.stride(1),
                                K.stride(2));
  } else {
    TORCH_CHECK(qkv.scalar_type() == at::kFloat, "decode_attention: qkv must be float32 or bfloat16");
    dispatch_dim<float>(d, qkv.data_ptr<float>(), b, cos.data_ptr<float>(), sin.data_ptr<float>(),
                        pos.data_ptr<int64_t>(), K.data_ptr<float>(), V.data_ptr<float>(), out.data_ptr<float>(),
                        rows, heads, kv_heads, K.stride(0), K.stride(1), K.stride(2));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "rotary + cache write + attention for one decode token per row");
}
