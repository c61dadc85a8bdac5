// A Gemm/MatMul weight as the kernels' W[M x K], built straight from ORT's initializer data.
//
// Session creation used to copy every weight into a dense M x K buffer (and transpose it) once
// to choose the format and again to build it. Now a weight already stored M x K (Gemm transB=1,
// a constant left operand, Conv) is read in place, and one stored K x M (MatMul, Gemm transB=0)
// is transposed a row panel at a time (kPanelBytes of scratch), so the extra memory while the
// sparse format is built is one panel, not a weight.
//
// The format follows the product's column count N at run time: ChooseFormat's cost model has
// three regimes (N = 1, 2..8, > 8); the format it picks for each is built at compile time, at
// most `max_formats` distinct ones per layer (the declared batch's first), and Multiply uses the
// one for the N it is given.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "sparse_kernels.h"

namespace onnxslim_ep {

// W[i][j] = data[i * cols + j], or data[j * rows + i] when `transposed` (the tensor is K x M).
struct WeightView {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0;
  bool transposed = false;
};

// Scratch for one row panel of a transposed weight (at least 4 rows).
constexpr int64_t kPanelBytes = int64_t{32} << 20;

// Product column regimes of the cost model: N = 1, 2..8, > 8 (kernels_choose.cc).
constexpr int kBuckets = 3;
int BucketOf(int64_t n);
constexpr std::array<int64_t, kBuckets> kBucketN = {1, 8, 64};  // a representative N of each

onnxslim_sparse::FormatCounts CountWeight(const WeightView& w);

// The weight held in one or more formats, each as row panels of SparseMatrix. It is itself a
// SparseMatrix: format() is the declared batch's, Multiply picks by n.
class LayerWeight final : public onnxslim_sparse::SparseMatrix {
 public:
  // formats[b]: the format for bucket b; the distinct ones are built in order of first use
  // starting with formats[first_bucket], at most max_formats of them; a bucket whose format is
  // not built uses formats[first_bucket]'s.
  LayerWeight(const WeightView& w, const std::array<onnxslim_sparse::Format, kBuckets>& formats, int first_bucket,
              int max_formats);

  onnxslim_sparse::Format format() const override { return formats_[primary_].front().format; }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  int64_t nonzeros() const override { return nonzeros_; }
  size_t bytes() const override;  // all formats held
  // Which format a product with n columns uses.
  onnxslim_sparse::Format FormatFor(int64_t n) const { return formats_[slot_[BucketOf(n)]].front().format; }
  int FormatCount() const { return static_cast<int>(formats_.size()); }

  void Multiply(const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, float alpha, const float* bias,
                onnxslim_sparse::Activation act, const onnxslim_sparse::ParallelFor& parallel) const override;

 private:
  struct Panel {
    onnxslim_sparse::Format format;
    int64_t row0;
    std::unique_ptr<onnxslim_sparse::SparseMatrix> m;
  };
  int64_t rows_, cols_, nonzeros_ = 0;
  std::vector<std::vector<Panel>> formats_;  // one panel list per distinct format built
  std::array<int, kBuckets> slot_{};         // bucket -> index into formats_
  int primary_ = 0;
};

}  // namespace onnxslim_ep
