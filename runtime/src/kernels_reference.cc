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

}  // namespace

__attribute__((weak)) std::unique_ptr<SparseMatrix> SparseMatrix::FromDense(const float* w, int64_t rows, int64_t cols,
                                                                           Format) {
  return std::make_unique<ReferenceMatrix>(w, rows, cols);
}

__attribute__((weak)) Format SparseMatrix::ChooseFormat(const float*, int64_t, int64_t, int64_t) { return Format::kDense; }

__attribute__((weak)) std::string KernelIsa() { return "reference"; }

}  // namespace onnxslim_sparse
