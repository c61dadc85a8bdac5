// Contract between the execution provider (ep_*.cc, owns ORT types) and the compute kernels
// (kernels_*.cc, no ORT headers). Everything the EP runs is one operation:
//
//     Y[M x N] = act( alpha * W[M x K] * X[K x N] + bias[M] )      (row-major, leading dims given)
//
// W is the constant weight held in a sparse format; X and Y are dense. Gemm/MatMul reach it
// with W = weight^T (the EP transposes the small activation side when needed), Conv through an
// im2col matrix X[C*kh*kw x OH*OW] per image and group-1 filters W[OC x C*kh*kw].
// A kernel must give the same result as the dense product within float32 rounding for every
// sparsity from 0 % to 100 % (all-zero rows included) and every N >= 1.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace onnxslim_sparse {

enum class Format : int {
  kCSR = 0,       // values + column indices + row pointers
  kBlock1x4 = 1,  // nonzero blocks of 1 row x 4 consecutive columns (zero-padded)
  kBlock4x1 = 2,  // nonzero blocks of 4 consecutive rows x 1 column (zero-padded)
  kDense = 3,     // fallback for weights too dense to gain (kept so every claim can run)
};

// Runs fn(begin, end) over [0, n) split into chunks, possibly in parallel. The EP passes one
// backed by ORT's thread pool or a simple std::thread split; nullptr = run serially.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;

enum class Activation : int { kNone = 0, kRelu = 1 };

class SparseMatrix {
 public:
  virtual ~SparseMatrix() = default;
  // Build from a dense row-major M x K weight; zeros are exact float zeros.
  static std::unique_ptr<SparseMatrix> FromDense(const float* w, int64_t rows, int64_t cols, Format format);
  // Pick the format for this weight expecting products with about n_hint columns (cost model or
  // a quick measurement; deterministic for the same weight and hint).
  static Format ChooseFormat(const float* w, int64_t rows, int64_t cols, int64_t n_hint);

  virtual Format format() const = 0;
  virtual int64_t rows() const = 0;
  virtual int64_t cols() const = 0;
  virtual int64_t nonzeros() const = 0;
  virtual size_t bytes() const = 0;  // storage actually held

  // Y = act(alpha * W * X + bias); bias may be nullptr. ldx >= n, ldy >= n.
  virtual void Multiply(const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, float alpha,
                        const float* bias, Activation act, const ParallelFor& parallel) const = 0;
};

// What each format would store for a weight: ChooseFormat's input, countable panel by panel.
// Counts of row panels that start at multiples of 4 rows add up (+=) to the whole weight's, so
// the EP can count a weight it only ever holds a panel of in row-major form (a transposed one).
struct FormatCounts {
  int64_t rows = 0, cols = 0, nnz = 0, blocks1x4 = 0, blocks4x1 = 0;
  FormatCounts& operator+=(const FormatCounts& o) {
    rows += o.rows;  // panels of the same weight share cols
    cols = o.cols;
    nnz += o.nnz;
    blocks1x4 += o.blocks1x4;
    blocks4x1 += o.blocks4x1;
    return *this;
  }
};
FormatCounts CountFormatEntries(const float* w, int64_t rows, int64_t cols);
// Same choice as SparseMatrix::ChooseFormat(w, rows, cols, n_hint) from the weight's counts.
Format ChooseFormatFromCounts(const FormatCounts& counts, int64_t n_hint);
// The cost model's expected time of a product with n columns in `format` (units: one CSR
// nonzero at batch 1); ChooseFormatFromCounts picks the lowest.
double FormatCost(const FormatCounts& counts, Format format, int64_t n);

// "avx2+fma" or "portable": which code path Multiply uses on this CPU (chosen at run time).
std::string KernelIsa();

}  // namespace onnxslim_sparse
