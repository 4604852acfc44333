// Fused CPU kernels for the MegatronBERT training step: forward and backward of each.
//
// Paddle 3.3's CPU kernels for these element-wise ops are single-threaded and not vectorised, and its
// column reductions (every bias gradient) are ~30x slower than a GEMV (measurements:
// shared/notes/performance.md). Each kernel here is one pass over the data, parallel over rows with
// OpenMP and vectorised by the compiler. Built with -fopenmp but linked against Paddle's own libiomp5
// (see loader.py): a second OpenMP runtime (GNU libgomp) would fight Paddle's for the same cores.
//
// Dropout draws its keep mask from a counter-based hash of (seed, element index): the backward pass
// recomputes the mask instead of storing it, and the result does not depend on the thread count.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace {

using Tensor = paddle::Tensor;

// ---- math that the compiler can vectorise (std::exp / std::erf calls block vectorisation) ----------
inline float bits_to_float(int32_t bits) { return __builtin_bit_cast(float, bits); }

inline int32_t float_to_bits(float value) { return __builtin_bit_cast(int32_t, value); }

// exp(x), Cephes' expf: range reduction by ln 2 and a degree-6 polynomial; relative error ~1e-7.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // not std::fmin/fmax: those block vectorisation
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float shifted = x * 1.44269504088896341f + round_magic;
  const int32_t k = float_to_bits(shifted) - 0x4B400000;  // the bits of round_magic
  const float kf = shifted - round_magic;
  float r = x - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((k + 127) << 23);
}

// erf(x), Abramowitz & Stegun 7.1.26: absolute error < 1.5e-7.
inline float fast_erf(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                      0.254829592f) * t;
  const float y = 1.0f - poly * fast_exp(-a * a);
  return std::copysign(y, x);
}

inline float fast_tanh(float x) {
  return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * x));
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;

template <bool kApproximate>
inline float gelu(float z) {
  if (kApproximate) return 0.5f * z * (1.0f + fast_tanh(kSqrt2OverPi * (z + kTanhCubic * z * z * z)));
  return 0.5f * z * (1.0f + fast_erf(z * kSqrtHalf));
}

template <bool kApproximate>
inline float gelu_grad(float z) {
  if (kApproximate) {
    const float t = fast_tanh(kSqrt2OverPi * (z + kTanhCubic * z * z * z));
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * z * z);
  }
  return 0.5f * (1.0f + fast_erf(z * kSqrtHalf)) + z * kInvSqrt2Pi * fast_exp(-0.5f * z * z);
}

// ---- dropout mask: a hash of (seed, index), recomputed in the backward pass -----------------------
inline uint32_t mix32(uint32_t x) {  // "lowbias32" integer hash (a bijection on 32 bits)
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  uint32_t key;
  uint32_t threshold;  // drop when the 24-bit uniform draw is below it
  float keep_scale;    // 1 / (1 - p)
  Dropout(float p, int64_t seed)
      : key(mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9U))),
        threshold(static_cast<uint32_t>(static_cast<double>(p) * 16777216.0)),
        keep_scale(p < 1.0f ? 1.0f / (1.0f - p) : 0.0f) {}
  // Multiplier of element `index`: 0 (dropped) or 1 / (1 - p) (kept).
  inline float scale(uint32_t index) const {
    return (mix32(index * 0x9e3779b9U + key) >> 8) >= threshold ? keep_scale : 0.0f;
  }
};

void check_float32(const Tensor& t, const char* name) {
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, name, " must be float32");
  PD_CHECK(t.is_cpu(), name, " must be on the CPU");
}

int64_t last_dim(const Tensor& t) { return t.shape().back(); }

// Per-thread column sums of a [rows, cols] matrix-like computation, reduced at the end in double:
// the bias gradients without Paddle's slow column reduction.
struct ColumnSums {
  int64_t cols;
  std::vector<double> partial;
  explicit ColumnSums(int64_t cols_) : cols(cols_), partial(static_cast<size_t>(omp_get_max_threads()) * cols_, 0.0) {}
  double* local() { return partial.data() + static_cast<size_t>(omp_get_thread_num()) * cols; }
  void write(float* out) const {
    const int threads = static_cast<int>(partial.size() / (cols ? cols : 1));
    for (int64_t j = 0; j < cols; ++j) {
      double total = 0.0;
      for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * cols + j];
      out[j] = static_cast<float>(total);
    }
  }
};

// ---- row kernels: one row each, every pointer a local __restrict argument so the compiler vectorises
// (pointers captured by an OpenMP region are reloaded through its shared struct and block vectorisation).

// out = (x - mean) * rstd * w + b; returns (mean, rstd).
inline void layer_norm_row(const float* __restrict x, const float* __restrict w, const float* __restrict b,
                           float* __restrict out, int64_t n, float epsilon, float* mean_out, float* rstd_out) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const float mean = sum / n;
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < n; ++j) sq += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.0f / std::sqrt(sq / n + epsilon);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = (x[j] - mean) * rstd * w[j] + b[j];
  *mean_out = mean;
  *rstd_out = rstd;
}

// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)); accumulates dw += g*xhat, db += g.
inline void layer_norm_grad_row(const float* __restrict x, const float* __restrict w, const float* __restrict g,
                                float* __restrict dx, double* __restrict acc_w, double* __restrict acc_b, int64_t n,
                                float mean, float rstd) {
  float mean_g = 0.0f, mean_gx = 0.0f;
#pragma omp simd reduction(+ : mean_g, mean_gx)
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    const float gw = g[j] * w[j];
    mean_g += gw;
    mean_gx += gw * xhat;
  }
  mean_g /= n;
  mean_gx /= n;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    dx[j] = rstd * (g[j] * w[j] - mean_g - xhat * mean_gx);
    acc_w[j] += static_cast<double>(g[j] * xhat);
    acc_b[j] += static_cast<double>(g[j]);
  }
}

template <bool kApproximate>
inline void bias_gelu_row(const float* __restrict x, const float* __restrict b, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = gelu<kApproximate>(x[j] + b[j]);
}

template <bool kApproximate>
inline void bias_gelu_grad_row(const float* __restrict x, const float* __restrict b, const float* __restrict g,
                               float* __restrict dx, double* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float d = g[j] * gelu_grad<kApproximate>(x[j] + b[j]);
    dx[j] = d;
    acc[j] += static_cast<double>(d);
  }
}

inline void bias_add_row(const float* __restrict x, const float* __restrict b, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] + b[j];
}

// dx = g (a copy), acc += g.
inline void copy_and_sum_row(const float* __restrict g, float* __restrict dx, double* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dx[j] = g[j];
    acc[j] += static_cast<double>(g[j]);
  }
}

// out = residual + (x + b) * keep / (1 - p); `first` is the flat index of the row's first element.
inline void bias_dropout_add_row(const float* __restrict x, const float* __restrict b, const float* __restrict res,
                                 float* __restrict out, int64_t n, Dropout dropout, uint32_t first) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = res[j] + (x[j] + b[j]) * dropout.scale(first + static_cast<uint32_t>(j));
}

inline void bias_add_residual_row(const float* __restrict x, const float* __restrict b, const float* __restrict res,
                                  float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = res[j] + x[j] + b[j];
}

// dx = g * keep / (1 - p), dres = g, acc += dx.
inline void bias_dropout_add_grad_row(const float* __restrict g, float* __restrict dx, float* __restrict dres,
                                      double* __restrict acc, int64_t n, Dropout dropout, uint32_t first) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float d = g[j] * dropout.scale(first + static_cast<uint32_t>(j));
    dx[j] = d;
    dres[j] = g[j];
    acc[j] += static_cast<double>(d);
  }
}

// probs = softmax(scale * s + mask). The mask row is one value per key (kMaskPerKey) or one value for all.
template <bool kMaskPerKey>
inline void softmax_row(const float* __restrict s, const float* __restrict m, float* __restrict probs, int64_t n,
                        float scale) {
  const float m0 = m[0];
  float mx = -3.0e38f;
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < n; ++k) {
    const float v = s[k] * scale + (kMaskPerKey ? m[k] : m0);
    mx = v > mx ? v : mx;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) {
    const float e = fast_exp(s[k] * scale + (kMaskPerKey ? m[k] : m0) - mx);
    probs[k] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) probs[k] *= inv;
}

inline void dropout_row(const float* __restrict p, float* __restrict out, int64_t n, Dropout dropout, uint32_t first) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = p[k] * dropout.scale(first + static_cast<uint32_t>(k));
}

// ds = scale * p * (dp - sum(dp * p)), with dp = g (no dropout) or g * keep / (1 - p).
template <bool kDropout>
inline void softmax_grad_row(const float* __restrict p, const float* __restrict g, float* __restrict ds, int64_t n,
                             float scale, Dropout dropout, uint32_t first) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t k = 0; k < n; ++k) {
    const float dp = kDropout ? g[k] * dropout.scale(first + static_cast<uint32_t>(k)) : g[k];
    dot += dp * p[k];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float dp = kDropout ? g[k] * dropout.scale(first + static_cast<uint32_t>(k)) : g[k];
    ds[k] = scale * p[k] * (dp - dot);
  }
}

// acc += g.
inline void add_row(const float* __restrict g, double* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(g[j]);
}

// One head's row: dst[d] = src[d] (+ bias[d]).
inline void copy_row(const float* __restrict src, const float* __restrict bias, float* __restrict dst, int64_t n) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] + bias[d];
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
  }
}

}  // namespace

// ================================================================================================
// LayerNorm over the last dim. Mean and Rstd are outputs kept for the backward pass.
std::vector<Tensor> LayerNormForward(const Tensor& x, const Tensor& weight, const Tensor& bias, float epsilon) {
  check_float32(x, "x");
  const int64_t cols = last_dim(x), rows = x.numel() / cols;
  PD_CHECK(weight.numel() == cols && bias.numel() == cols, "layer_norm: weight/bias size != last dim of x");
  Tensor out = paddle::empty(x.shape(), x.dtype(), x.place());
  Tensor mean = paddle::empty({rows}, x.dtype(), x.place());
  Tensor rstd = paddle::empty({rows}, x.dtype(), x.place());
  const float *xp = x.data<float>(), *w = weight.data<float>(), *b = bias.data<float>();
  float *op = out.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) layer_norm_row(xp + i * cols, w, b, op + i * cols, cols, epsilon, mp + i, rp + i);
  return {out, mean, rstd};
}

std::vector<Tensor> LayerNormBackward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                      const Tensor& grad_out, float epsilon) {
  const int64_t cols = last_dim(x), rows = x.numel() / cols;
  Tensor grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  Tensor grad_w = paddle::empty(weight.shape(), x.dtype(), x.place());
  Tensor grad_b = paddle::empty(weight.shape(), x.dtype(), x.place());
  const float *xp = x.data<float>(), *w = weight.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>();
  const float* gp = grad_out.data<float>();
  float* gx = grad_x.data<float>();
  ColumnSums sum_w(cols), sum_b(cols);
#pragma omp parallel
  {
    double *acc_w = sum_w.local(), *acc_b = sum_b.local();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i)
      layer_norm_grad_row(xp + i * cols, w, gp + i * cols, gx + i * cols, acc_w, acc_b, cols, mp[i], rp[i]);
  }
  sum_w.write(grad_w.data<float>());
  sum_b.write(grad_b.data<float>());
  return {grad_x, grad_w, grad_b};
}

// ================================================================================================
// out = gelu(x + bias), exact (erf) or tanh-approximated. The backward recomputes from x.
std::vector<Tensor> BiasGeluForward(const Tensor& x, const Tensor& bias, bool approximate) {
  check_float32(x, "x");
  const int64_t cols = last_dim(x), rows = x.numel() / cols;
  PD_CHECK(bias.numel() == cols, "bias_gelu: bias size != last dim of x");
  Tensor out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float *xp = x.data<float>(), *b = bias.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    if (approximate) {
      bias_gelu_row<true>(xp + i * cols, b, op + i * cols, cols);
    } else {
      bias_gelu_row<false>(xp + i * cols, b, op + i * cols, cols);
    }
  }
  return {out};
}

std::vector<Tensor> BiasGeluBackward(const Tensor& x, const Tensor& bias, const Tensor& grad_out, bool approximate) {
  const int64_t cols = last_dim(x), rows = x.numel() / cols;
  Tensor grad_x = paddle::empty(x.shape(), x.dtype(), x.place());
  Tensor grad_b = paddle::empty(bias.shape(), x.dtype(), x.place());
  const float *xp = x.data<float>(), *b = bias.data<float>(), *gp = grad_out.data<float>();
  float* gx = grad_x.data<float>();
  ColumnSums sums(cols);
#pragma omp parallel
  {
    double* acc = sums.local();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      if (approximate) {
        bias_gelu_grad_row<true>(xp + i * cols, b, gp + i * cols, gx + i * cols, acc, cols);
      } else {
        bias_gelu_grad_row<false>(xp + i * cols, b, gp + i * cols, gx + i * cols, acc, cols);
      }
    }
  }
  sums.write(grad_b.data<float>());
  return {grad_x, grad_b};
}

// ================================================================================================
// out = x + bias: a bias add whose gradient is a fast column sum.
std::vector<Tensor> BiasAddForward(const Tensor& x, const Tensor& bias) {
  check_float32(x, "x");
  const int64_t cols = last_dim(x), rows = x.numel() / cols;
  PD_CHECK(bias.numel() == cols, "bias_add: bias size != last dim of x");
  Tensor out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float *xp = x.data<float>(), *b = bias.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) bias_add_row(xp + i * cols, b, op + i * cols, cols);
  return {out};
}

std::vector<Tensor> BiasAddBackward(const Tensor& bias, const Tensor& grad_out) {
  const int64_t cols = bias.numel(), rows = grad_out.numel() / cols;
  Tensor grad_x = paddle::empty(grad_out.shape(), grad_out.dtype(), grad_out.place());
  Tensor grad_b = paddle::empty(bias.shape(), bias.dtype(), bias.place());
  const float* gp = grad_out.data<float>();
  float* gx = grad_x.data<float>();
  ColumnSums sums(cols);
#pragma omp parallel
  {
    double* acc = sums.local();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) copy_and_sum_row(gp + i * cols, gx + i * cols, acc, cols);
  }
  sums.write(grad_b.data<float>());
  return {grad_x, grad_b};
}

// ================================================================================================
// out = residual + dropout(x + bias): the end of each residual branch.
std::vector<Tensor> BiasDropoutAddForward(const Tensor& x, const Tensor& bias, const Tensor& residual,
                                          float dropout_p, int64_t seed) {
  check_float32(x, "x");
  const int64_t cols = last_dim(x), rows = x.numel() / cols;
  PD_CHECK(bias.numel() == cols, "bias_dropout_add: bias size != last dim of x");
  PD_CHECK(residual.numel() == x.numel(), "bias_dropout_add: residual and x differ in size");
  PD_CHECK(x.numel() < (int64_t(1) << 32), "bias_dropout_add: more than 2^32 elements");
  Tensor out = paddle::empty(x.shape(), x.dtype(), x.place());
  const float *xp = x.data<float>(), *b = bias.data<float>(), *rp = residual.data<float>();
  float* op = out.data<float>();
  const Dropout dropout(dropout_p, seed);
  const bool drop = dropout_p > 0.0f;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t base = i * cols;
    if (drop) {
      bias_dropout_add_row(xp + base, b, rp + base, op + base, cols, dropout, static_cast<uint32_t>(base));
    } else {
      bias_add_residual_row(xp + base, b, rp + base, op + base, cols);
    }
  }
  return {out};
}

std::vector<Tensor> BiasDropoutAddBackward(const Tensor& bias, const Tensor& grad_out, float dropout_p, int64_t seed) {
  const int64_t cols = bias.numel(), rows = grad_out.numel() / cols;
  Tensor grad_x = paddle::empty(grad_out.shape(), grad_out.dtype(), grad_out.place());
  Tensor grad_b = paddle::empty(bias.shape(), bias.dtype(), bias.place());
  Tensor grad_residual = paddle::empty(grad_out.shape(), grad_out.dtype(), grad_out.place());
  const float* gp = grad_out.data<float>();
  float *gx = grad_x.data<float>(), *gr = grad_residual.data<float>();
  const Dropout dropout(dropout_p, seed);
  ColumnSums sums(cols);
#pragma omp parallel
  {
    double* acc = sums.local();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t base = i * cols;
      bias_dropout_add_grad_row(gp + base, gx + base, gr + base, acc, cols, dropout, static_cast<uint32_t>(base));
    }
  }
  sums.write(grad_b.data<float>());
  return {grad_x, grad_b, grad_residual};
}

// ================================================================================================
// Attention probabilities: softmax(scores * scale + mask) over the last dim, then dropout.
// scores: [B, heads, Sq, Sk]; mask: additive, 4-D, each dim 1 (broadcast) or equal to the scores'.
namespace {

struct MaskIndex {
  const float* data;
  int64_t stride[4];
  int64_t heads, queries;
  MaskIndex(const Tensor& mask, const std::vector<int64_t>& shape)
      : data(mask.data<float>()), heads(shape[1]), queries(shape[2]) {
    const auto& m = mask.shape();
    PD_CHECK(m.size() == 4, "attention mask must be 4-D (broadcastable to [B, heads, Sq, Sk])");
    int64_t running = 1;
    for (int d = 3; d >= 0; --d) {
      PD_CHECK(m[d] == 1 || m[d] == shape[d], "attention mask dim ", d, " is ", m[d], ", expected 1 or ", shape[d]);
      stride[d] = m[d] == 1 ? 0 : running;
      running *= m[d];
    }
  }
  bool per_key() const { return stride[3] != 0; }
  // The mask row of scores row `row` (a flat index over B * heads * Sq).
  const float* row(int64_t row) const {
    const int64_t q = row % queries, bh = row / queries;
    return data + (bh / heads) * stride[0] + (bh % heads) * stride[1] + q * stride[2];
  }
};

inline void masked_softmax_row(const MaskIndex& mask, int64_t i, const float* s, float* probs, int64_t n, float scale) {
  if (mask.per_key()) {
    softmax_row<true>(s, mask.row(i), probs, n, scale);
  } else {
    softmax_row<false>(s, mask.row(i), probs, n, scale);
  }
}

}  // namespace

std::vector<Tensor> MaskedSoftmaxForward(const Tensor& scores, const Tensor& mask, float scale) {
  check_float32(scores, "scores");
  const auto shape = scores.shape();
  PD_CHECK(shape.size() == 4, "attention scores must be 4-D [B, heads, Sq, Sk]");
  const MaskIndex mask_index(mask, shape);
  const int64_t n = shape[3], rows = scores.numel() / n;
  Tensor out = paddle::empty(shape, scores.dtype(), scores.place());
  const float* sp = scores.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) masked_softmax_row(mask_index, i, sp + i * n, op + i * n, n, scale);
  return {out};
}

std::vector<Tensor> MaskedSoftmaxBackward(const Tensor& out, const Tensor& grad_out, float scale) {
  const int64_t n = last_dim(out), rows = out.numel() / n;
  Tensor grad_scores = paddle::empty(out.shape(), out.dtype(), out.place());
  const float *pp = out.data<float>(), *gp = grad_out.data<float>();
  float* gs = grad_scores.data<float>();
  const Dropout no_dropout(0.0f, 0);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) softmax_grad_row<false>(pp + i * n, gp + i * n, gs + i * n, n, scale, no_dropout, 0);
  return {grad_scores};
}

std::vector<Tensor> MaskedSoftmaxDropoutForward(const Tensor& scores, const Tensor& mask, float scale,
                                                float dropout_p, int64_t seed) {
  check_float32(scores, "scores");
  const auto shape = scores.shape();
  PD_CHECK(shape.size() == 4, "attention scores must be 4-D [B, heads, Sq, Sk]");
  PD_CHECK(scores.numel() < (int64_t(1) << 32), "masked_softmax_dropout: more than 2^32 elements");
  const MaskIndex mask_index(mask, shape);
  const int64_t n = shape[3], rows = scores.numel() / n;
  Tensor out = paddle::empty(shape, scores.dtype(), scores.place());
  Tensor probs = paddle::empty(shape, scores.dtype(), scores.place());
  const float* sp = scores.data<float>();
  float *op = out.data<float>(), *pp = probs.data<float>();
  const Dropout dropout(dropout_p, seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    masked_softmax_row(mask_index, i, sp + i * n, pp + i * n, n, scale);
    dropout_row(pp + i * n, op + i * n, n, dropout, static_cast<uint32_t>(i * n));
  }
  return {out, probs};
}

std::vector<Tensor> MaskedSoftmaxDropoutBackward(const Tensor& probs, const Tensor& grad_out, float scale,
                                                 float dropout_p, int64_t seed) {
  const int64_t n = last_dim(probs), rows = probs.numel() / n;
  Tensor grad_scores = paddle::empty(probs.shape(), probs.dtype(), probs.place());
  const float *pp = probs.data<float>(), *gp = grad_out.data<float>();
  float* gs = grad_scores.data<float>();
  const Dropout dropout(dropout_p, seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    softmax_grad_row<true>(pp + i * n, gp + i * n, gs + i * n, n, scale, dropout, static_cast<uint32_t>(i * n));
  return {grad_scores};
}

// ================================================================================================
// Heads: [B, S, heads * hd] (+ bias) <-> [B, heads, S, hd].
namespace {

// Copies between the two layouts; `to_heads` picks the direction. `bias` (nullable) is added going to heads.
void permute_heads(const float* src, float* dst, const float* bias, int64_t batch, int64_t seq, int64_t heads,
                   int64_t head_dim, bool to_heads) {
  const int64_t hidden = heads * head_dim;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t flat = (b * seq + s) * hidden + h * head_dim;
        const int64_t split = ((b * heads + h) * seq + s) * head_dim;
        if (to_heads) {
          copy_row(src + flat, bias ? bias + h * head_dim : nullptr, dst + split, head_dim);
        } else {
          copy_row(src + split, nullptr, dst + flat, head_dim);
        }
      }
    }
  }
}

}  // namespace

std::vector<Tensor> BiasSplitHeadsForward(const Tensor& x, const Tensor& bias, int num_heads) {
  check_float32(x, "x");
  const auto shape = x.shape();
  PD_CHECK(shape.size() == 3, "bias_split_heads: x must be [B, S, hidden]");
  PD_CHECK(shape[2] % num_heads == 0 && bias.numel() == shape[2], "bias_split_heads: bad hidden size or bias");
  const int64_t head_dim = shape[2] / num_heads;
  Tensor out = paddle::empty({shape[0], num_heads, shape[1], head_dim}, x.dtype(), x.place());
  permute_heads(x.data<float>(), out.data<float>(), bias.data<float>(), shape[0], shape[1], num_heads, head_dim, true);
  return {out};
}

std::vector<Tensor> BiasSplitHeadsBackward(const Tensor& bias, const Tensor& grad_out) {
  const auto shape = grad_out.shape();  // [B, heads, S, hd]
  const int64_t hidden = shape[1] * shape[3], rows = shape[0] * shape[2];
  Tensor grad_x = paddle::empty({shape[0], shape[2], hidden}, grad_out.dtype(), grad_out.place());
  Tensor grad_b = paddle::empty(bias.shape(), bias.dtype(), bias.place());
  permute_heads(grad_out.data<float>(), grad_x.data<float>(), nullptr, shape[0], shape[2], shape[1], shape[3], false);
  const float* gx = grad_x.data<float>();
  ColumnSums sums(hidden);
#pragma omp parallel
  {
    double* acc = sums.local();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) add_row(gx + i * hidden, acc, hidden);
  }
  sums.write(grad_b.data<float>());
  return {grad_x, grad_b};
}

std::vector<Tensor> MergeHeadsForward(const Tensor& x) {
  check_float32(x, "x");
  const auto shape = x.shape();  // [B, heads, S, hd]
  PD_CHECK(shape.size() == 4, "merge_heads: x must be [B, heads, S, hd]");
  Tensor out = paddle::empty({shape[0], shape[2], shape[1] * shape[3]}, x.dtype(), x.place());
  permute_heads(x.data<float>(), out.data<float>(), nullptr, shape[0], shape[2], shape[1], shape[3], false);
  return {out};
}

std::vector<Tensor> MergeHeadsBackward(const Tensor& x, const Tensor& grad_out) {
  const auto shape = x.shape();
  Tensor grad_x = paddle::empty(shape, x.dtype(), x.place());
  permute_heads(grad_out.data<float>(), grad_x.data<float>(), nullptr, shape[0], shape[2], shape[1], shape[3], true);
  return {grad_x};
}

// ================================================================================================
// Registration. Shapes are only needed by static graphs; dygraph takes them from the kernels.
namespace {
using Shape = std::vector<int64_t>;
using DType = paddle::DataType;

std::vector<Shape> FirstShape2(const Shape& x, const Shape&) { return {x}; }
std::vector<Shape> FirstShape3(const Shape& x, const Shape&, const Shape&) { return {x}; }
std::vector<DType> FirstDtype1(const DType& x) { return {x}; }
std::vector<DType> FirstDtype2(const DType& x, const DType&) { return {x}; }
std::vector<DType> FirstDtype3(const DType& x, const DType&, const DType&) { return {x}; }
std::vector<Shape> LayerNormShapes(const Shape& x, const Shape&, const Shape&) {
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < x.size(); ++d) rows *= x[d];
  return {x, {rows}, {rows}};
}
std::vector<DType> LayerNormDtypes(const DType& x, const DType&, const DType&) { return {x, x, x}; }
std::vector<Shape> SoftmaxDropoutShapes(const Shape& s, const Shape&) { return {s, s}; }
std::vector<DType> SoftmaxDropoutDtypes(const DType& s, const DType&) { return {s, s}; }
std::vector<Shape> SplitHeadsShape(const Shape& x, const Shape&, const int& num_heads) {
  return {{x[0], num_heads, x[1], x[2] / num_heads}};
}
std::vector<Shape> MergeHeadsShape(const Shape& x) { return {{x[0], x[2], x[1] * x[3]}}; }
}  // namespace

PD_BUILD_OP(pmb_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormDtypes));

PD_BUILD_GRAD_OP(pmb_layer_norm)
    .Inputs({"X", "Weight", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

PD_BUILD_OP(pmb_bias_gelu)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .Attrs({"approximate: bool"})
    .SetKernelFn(PD_KERNEL(BiasGeluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_GRAD_OP(pmb_bias_gelu)
    .Inputs({"X", "Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Bias")})
    .Attrs({"approximate: bool"})
    .SetKernelFn(PD_KERNEL(BiasGeluBackward));

PD_BUILD_OP(pmb_bias_add)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(BiasAddForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_GRAD_OP(pmb_bias_add)
    .Inputs({"Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(BiasAddBackward));

PD_BUILD_OP(pmb_bias_dropout_add)
    .Inputs({"X", "Bias", "Residual"})
    .Outputs({"Out"})
    .Attrs({"dropout_p: float", "seed: int64_t"})
    .SetKernelFn(PD_KERNEL(BiasDropoutAddForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape3))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype3));

PD_BUILD_GRAD_OP(pmb_bias_dropout_add)
    .Inputs({"Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Bias"), paddle::Grad("Residual")})
    .Attrs({"dropout_p: float", "seed: int64_t"})
    .SetKernelFn(PD_KERNEL(BiasDropoutAddBackward));

PD_BUILD_OP(pmb_masked_softmax)
    .Inputs({"Scores", "Mask"})
    .Outputs({"Out"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_GRAD_OP(pmb_masked_softmax)
    .Inputs({"Out", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Scores")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxBackward));

PD_BUILD_OP(pmb_masked_softmax_dropout)
    .Inputs({"Scores", "Mask"})
    .Outputs({"Out", "Probs"})
    .Attrs({"scale: float", "dropout_p: float", "seed: int64_t"})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxDropoutForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SoftmaxDropoutShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(SoftmaxDropoutDtypes));

PD_BUILD_GRAD_OP(pmb_masked_softmax_dropout)
    .Inputs({"Probs", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Scores")})
    .Attrs({"scale: float", "dropout_p: float", "seed: int64_t"})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxDropoutBackward));

PD_BUILD_OP(pmb_bias_split_heads)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .Attrs({"num_heads: int"})
    .SetKernelFn(PD_KERNEL(BiasSplitHeadsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SplitHeadsShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_GRAD_OP(pmb_bias_split_heads)
    .Inputs({"Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(BiasSplitHeadsBackward));

PD_BUILD_OP(pmb_merge_heads)
    .Inputs({"X"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(MergeHeadsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeHeadsShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype1));

PD_BUILD_GRAD_OP(pmb_merge_heads)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(MergeHeadsBackward));
