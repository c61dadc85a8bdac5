// Naive reference of the kernel contract (sparse_kernels.h): a dense row-major copy and a plain
// triple loop. It lets the EP build and be tested on its own; the factory functions are weak
// symbols, so the optimised kernels (kernels_*.cc, strong definitions) replace them at link time
// without either side knowing about the other.
#include <algorithm>
#include <vector>

#include "sparse_kernels.h"

namespace onnxslim_sparse {
namespace {

class ReferenceMatrix final : public SparseMatrix {
 public:
  ReferenceMatrix(const float* w, int64_t rows, int64_t cols) : w_(w, w + rows * cols), rows_(rows), cols_(cols) {
    nnz_ = static_cast<int64_t>(std::count_if(w_.begin(), w_.end(), [](float v) { return v != 0.0f; }));
  }
  Format format() const override { return Format::kDense; }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  int64_t nonzeros() const override { return nnz_; }
  size_t bytes() const override { return w_.size() * sizeof(float); }

  void Multiply(const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, float alpha, const float* bias,
                Activation act, const ParallelFor& parallel) const override {
    auto rows_fn = [&](int64_t r0, int64_t r1) {
      std::vector<double> acc(static_cast<size_t>(n));
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t k = 0; k < cols_; ++k) {
          const float wv = w_[r * cols_ + k];
          if (wv == 0.0f) continue;
          for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(wv) * x[k * ldx + j];
        }
        for (int64_t j = 0; j < n; ++j) {
          float v = alpha * static_cast<float>(acc[j]) + (bias ? bias[r] : 0.0f);
          y[r * ldy + j] = (act == Activation::kRelu && v < 0.0f) ? 0.0f : v;
        }
      }
    };
    if (parallel) parallel(rows_, rows_fn); else rows_fn(0, rows_);
  }

 private:
  std::vector<float> w_;
  int64_t rows_, cols_, nnz_ = 0;
};

class ReferenceConv final : public SparseConv {
 public:
  ReferenceConv(const float* w, int64_t oc, int64_t ic, int64_t kh, int64_t kw)
      : w_(w, w + oc * ic * kh * kw), oc_(oc), ic_(ic), kh_(kh), kw_(kw) {}
  int64_t out_channels() const override { return oc_; }
  int64_t in_channels() const override { return ic_; }
  int64_t nonzeros() const override {
    return static_cast<int64_t>(std::count_if(w_.begin(), w_.end(), [](float v) { return v != 0.0f; }));
  }
  size_t bytes() const override { return w_.size() * sizeof(float); }

  void Run(const float* x, int64_t batch, const ConvGeometry& g, float* y, const float* bias, Activation act,
           const ParallelFor&) const override {
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t o = 0; o < oc_; ++o)
        for (int64_t oy = 0; oy < g.out_h; ++oy)
          for (int64_t ox = 0; ox < g.out_w; ++ox) {
            double acc = 0.0;
            for (int64_t c = 0; c < ic_; ++c)
              for (int64_t ky = 0; ky < kh_; ++ky)
                for (int64_t kx = 0; kx < kw_; ++kx) {
                  const float wv = w_[((o * ic_ + c) * kh_ + ky) * kw_ + kx];
                  const int64_t iy = oy - g.pad_top + ky * g.dil_h, ix = ox - g.pad_left + kx * g.dil_w;
                  if (wv == 0.0f || iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) continue;
                  acc += static_cast<double>(wv) * x[((n * ic_ + c) * g.in_h + iy) * g.in_w + ix];
                }
            const float v = static_cast<float>(acc) + (bias ? bias[o] : 0.0f);
            y[((n * oc_ + o) * g.out_h + oy) * g.out_w + ox] = (act == Activation::kRelu && v < 0.0f) ? 0.0f : v;
          }
  }

 private:
  std::vector<float> w_;
  int64_t oc_, ic_, kh_, kw_;
};

}  // namespace

__attribute__((weak)) std::unique_ptr<SparseConv> SparseConv::FromDense(const float* w, int64_t out_channels,
                                                                      int64_t in_channels, int64_t kh, int64_t kw) {
  return std::make_unique<ReferenceConv>(w, out_channels, in_channels, kh, kw);
}

// Without the real kernels every conv claim is declined, as ChooseFormat's kDense declines the rest.
__attribute__((weak)) double ConvRelativeCost(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, bool) {
  return 2.0;
}
__attribute__((weak)) int64_t ConvPathRuns(int) { return 0; }
__attribute__((weak)) void CountConvPathRun(int, int64_t) {}

__attribute__((weak)) std::unique_ptr<SparseMatrix> SparseMatrix::FromDense(const float* w, int64_t rows, int64_t cols,
                                                                           Format) {
  return std::make_unique<ReferenceMatrix>(w, rows, cols);
}

__attribute__((weak)) Format SparseMatrix::ChooseFormat(const float*, int64_t, int64_t, int64_t) { return Format::kDense; }

__attribute__((weak)) std::string KernelIsa() { return "reference"; }

}  // namespace onnxslim_sparse
