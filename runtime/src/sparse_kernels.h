// Contract between the execution provider (ep_*.cc, owns ORT types) and the compute kernels
// (kernels_*.cc, no ORT headers). Everything the EP runs is one operation:
//
//     Y[M x N] = act( alpha * W[M x K] * X[K x N] + bias[M] )      (row-major, leading dims given)
//
// W is the constant weight held in a sparse format; X and Y are dense. Gemm/MatMul reach it
// with W = weight^T (the EP transposes the small activation side when needed), Conv through an
// im2col matrix X[C*kh*kw x OH*OW] per image and group-1 filters W[OC x C*kh*kw], or -- for
// stride-1 convolutions -- without any im2col through SparseConv below (a direct sparse conv).
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

// Where one image of a stride-1 convolution sits and where its output goes. Any (asymmetric)
// padding and dilation; a 1-D conv is a 2-D one with in_h = out_h = 1 and kh = 1.
struct ConvGeometry {
  int64_t in_h = 1, in_w = 1;
  int64_t dil_h = 1, dil_w = 1;
  int64_t pad_top = 0, pad_left = 0;  // leading pads; the trailing ones follow from out_h/out_w
  int64_t out_h = 1, out_w = 1;
};

// A group-1, stride-1 convolution with a constant sparse filter bank W[OC][C][kh][kw], run as a
// direct sparse convolution (Park et al. 2017, "Faster CNNs with direct sparse convolutions"):
// the image is copied once into a zero-padded [C][Hp][Wp] buffer and every output row of
// "padded width" Wp is  out[o][i] = sum_j w[o][j] * in_pad[i + offset(j)],  offset(j) =
// c*Hp*Wp + ky*dil_h*Wp + kx*dil_w, i.e. contiguous loads at a constant shift per nonzero instead
// of an im2col matrix of C*kh*kw x OH*OW floats. Same accuracy contract as SparseMatrix.
class SparseConv {
 public:
  virtual ~SparseConv() = default;
  // w: dense [out_channels][in_channels][kh][kw]; zeros are exact float zeros.
  static std::unique_ptr<SparseConv> FromDense(const float* w, int64_t out_channels, int64_t in_channels,
                                               int64_t kh, int64_t kw);

  virtual int64_t out_channels() const = 0;
  virtual int64_t in_channels() const = 0;
  virtual int64_t nonzeros() const = 0;
  virtual size_t bytes() const = 0;

  // y[b][o][oy][ox] = act(sum_{c,ky,kx} w[o][c][ky][kx] * x[b][c][oy - pad_top + ky*dil_h]
  // [ox - pad_left + kx*dil_w] + bias[o]) for `batch` NCHW images (zero outside the image);
  // bias may be nullptr. Bit-identical for any ParallelFor.
  virtual void Run(const float* x, int64_t batch, const ConvGeometry& g, float* y, const float* bias,
                   Activation act, const ParallelFor& parallel) const = 0;
};

// Cost model for claiming a convolution (kernels_choose.cc): the expected time of the sparse
// run divided by that of ORT's dense Conv (MLAS: im2col + blocked SGEMM) on one image, from the
// filter's nonzeros and the layer's shape; direct = the SparseConv path, else the im2col +
// SparseMatrix path. Above 1 the sparse run is expected to lose. Constants fitted to
// bench/sparse.py's interleaved measurements (see the file).
double ConvRelativeCost(int64_t nonzeros, int64_t out_channels, int64_t in_channels, int64_t kh, int64_t kw,
                        int64_t out_h, int64_t out_w, int64_t in_h, int64_t in_w, bool direct);

// How many times each conv path ran since the library was loaded (all sessions, all threads):
// which = 0 direct (SparseConv::Run images), 1 im2col images, 2 pointwise (1x1 products). The
// EP counts; tests read them through the C ABI to prove which path a layer took.
int64_t ConvPathRuns(int which);
void CountConvPathRun(int which, int64_t images);

// "avx2+fma" or "portable": which code path Multiply uses on this CPU (chosen at run time).
std::string KernelIsa();

}  // namespace onnxslim_sparse
