// ChooseFormat: a cost model, not a measurement, so the choice is deterministic and free.
//
// Each format's time is modelled as (entries it stores) x (cost of one entry), with per-entry
// costs fitted to measurements (below; docs/sparse_kernels.md). An entry is a
// nonzero (CSR), a 4-value block (1x4, 4x1) or a weight (dense). At batch 1 the product streams
// W from memory once; at batch n > 1 every entry costs a pass over ceil(n/8) vectors of X.
#include <algorithm>
#include <cstdint>

#include "kernels_internal.h"
#include "sparse_kernels.h"

namespace onnxslim_sparse {
namespace {

struct Counts {
  int64_t nnz = 0, blocks1x4 = 0, blocks4x1 = 0;
};

Counts CountEntries(const float* w, int64_t m, int64_t k) {
  Counts c;
  for (int64_t i = 0; i < m; ++i) {
    const float* row = w + i * k;
    for (int64_t j = 0; j < k; ++j) c.nnz += row[j] != 0.0f;
    if (k >= 4) {  // same greedy placement as BuildBlock1x4
      for (int64_t j = 0; j < k;) {
        if (row[j] == 0.0f) {
          ++j;
          continue;
        }
        ++c.blocks1x4;
        j = std::min(j, k - 4) + 4;
      }
    }
  }
  for (int64_t r0 = 0; r0 < m; r0 += 4) {
    const int64_t rn = std::min<int64_t>(4, m - r0);
    for (int64_t j = 0; j < k; ++j) {
      bool any = false;
      for (int64_t r = 0; r < rn; ++r) any |= w[(r0 + r) * k + j] != 0.0f;
      c.blocks4x1 += any;
    }
  }
  return c;
}

// Relative cost of one entry, CSR's nonzero = 1: at batch 1, and per 8-column vector at batch
// 2..8 and above 8 (the 4x1 kernel's X-row reuse pays most when CSR has only 8-wide tiles).
// Fitted by hand to interleaved, cache-flushed medians (bench/sparse_kernels.py, 1 thread, AVX2
// machine) on 2048x4096 weights at 90 % sparsity (random, 4x1- and 1x4-structured; n = 1, 8,
// 32, 196) and on the bench's random 25088x4096 and conv shapes at 50-70 %, where per entry
// 1x4 blocks cost 2.2-3.2 (n = 1) and 3.2-4.0 (n > 1), 4x1 blocks 2.5-3.7 (n = 1), 1.7 (n = 8)
// and 2.4-3.2 (n >= 32), dense weights 0.5-1.4 and 0.5-1.6. That machine was shared and noisy;
// the model only has to rank formats, and CSR is never far from the best on random sparsity.
// A block holds 4 values, so a full block beats CSR when its cost is below 4. The batch-1 block
// costs sit at the top of their range because a first bench run at 50 % random sparsity
// (25088x4096) measured 1x4 at 0.78x dense where CSR made 1.02x.
struct EntryCost {
  double batch1, small_batch_vector, per_vector;
};
constexpr EntryCost kCsr{1.0, 1.0, 1.0};
constexpr EntryCost kBlock1x4{3.0, 3.3, 3.3};
constexpr EntryCost kBlock4x1{3.0, 1.7, 2.5};
constexpr EntryCost kDenseCost{0.5, 0.6, 0.6};

double Cost(const EntryCost& c, int64_t entries, int64_t n) {
  if (n <= 1) return c.batch1 * static_cast<double>(entries);
  const double per_vector = n <= 8 ? c.small_batch_vector : c.per_vector;
  return per_vector * static_cast<double>(entries) * static_cast<double>((n + 7) / 8);
}

}  // namespace

FormatCounts CountFormatEntries(const float* w, int64_t rows, int64_t cols) {
  const Counts c = CountEntries(w, rows, cols);
  FormatCounts out;
  out.rows = rows;
  out.cols = cols;
  out.nnz = c.nnz;
  out.blocks1x4 = c.blocks1x4;
  out.blocks4x1 = c.blocks4x1;
  return out;
}

Format ChooseFormatFromCounts(const FormatCounts& c, int64_t n_hint) {
  const int64_t n = std::max<int64_t>(1, n_hint);
  Format best = Format::kCSR;
  double best_cost = Cost(kCsr, c.nnz, n);
  const auto consider = [&](Format f, double cost) {
    if (cost < best_cost) {  // strict: ties keep the earlier (simpler) format
      best = f;
      best_cost = cost;
    }
  };
  if (c.cols >= 4) consider(Format::kBlock1x4, Cost(kBlock1x4, c.blocks1x4, n));
  consider(Format::kBlock4x1, Cost(kBlock4x1, c.blocks4x1, n));
  consider(Format::kDense, Cost(kDenseCost, c.rows * c.cols, n));
  return best;
}

double FormatCost(const FormatCounts& c, Format format, int64_t n_hint) {
  const int64_t n = std::max<int64_t>(1, n_hint);
  switch (format) {
    case Format::kCSR: return Cost(kCsr, c.nnz, n);
    case Format::kBlock1x4: return Cost(kBlock1x4, c.blocks1x4, n);
    case Format::kBlock4x1: return Cost(kBlock4x1, c.blocks4x1, n);
    case Format::kDense: return Cost(kDenseCost, c.rows * c.cols, n);
  }
  return 0.0;
}

Format SparseMatrix::ChooseFormat(const float* w, int64_t rows, int64_t cols, int64_t n_hint) {
  return ChooseFormatFromCounts(CountFormatEntries(w, rows, cols), n_hint);
}

}  // namespace onnxslim_sparse

namespace onnxslim_sparse {

// Conv claim cost model. Unit: one multiply-add of ORT's dense Conv (MLAS SGEMM). Per image:
//   dense  = OC*K*P + kConvMlasIm2col * K*P   (K = C*kh*kw, P = OH*OW; no im2col for a 1x1
//                                              stride-1 unpadded conv, which is a plain GEMM)
//   direct = kConvDirectNz * nnz * T + kConvPad * C*Hp*Wp + kConvStore * OC*P
//            (T = positions computed: whole 64-position tiles over OH rows of padded width Wp)
//   im2col = kConvIm2colNz * nnz * P + kConvOurIm2col * K*P + OC*P
// Fitted by least squares on relative error to bench/results/sparse_conv_calibration.json
// (bench/sparse.py --format csr, so every layer is timed whether it wins or not; batch 1, one
// thread, 30-95 % zeros; 3x3 stride-1 shapes from VGG-16 224x224 to ResNet-50 7x7): direct nz
// 2.14, padded copy + store 46.8 per element (one term: C = OC in every fitted shape), MLAS
// im2col 11.8 per element; median error of the predicted ratio 5 %, no layer on the wrong side
// of 1. Rounded towards declining (the machine was shared; two 60 % layers that win by 7-12 %
// are left to ORT). The im2col constants rest on fewer shapes: the 1x1 layers (3.2 per nonzero
// x column, break-even 69 %) and one stride-2 3x3 (ours 33-47 per column element).
namespace {
constexpr double kConvDirectNz = 2.3;
constexpr double kConvPad = 24.0;        // padded copy, offsets and buffers per padded element
constexpr double kConvStore = 24.0;      // tile epilogue and NCHW store per output element
constexpr double kConvMlasIm2col = 12.0; // MLAS's im2col: it dominates on 112x112 / 224x224 maps
constexpr double kConvIm2colNz = 3.2;    // the SparseMatrix CSR product per nonzero x column
constexpr double kConvOurIm2col = 45.0;  // our scalar, bounds-checked im2col per column element
}  // namespace

double ConvRelativeCost(int64_t nonzeros, int64_t out_channels, int64_t in_channels, int64_t kh, int64_t kw,
                        int64_t out_h, int64_t out_w, int64_t in_h, int64_t in_w, bool direct) {
  const double k = static_cast<double>(in_channels * kh * kw), p = static_cast<double>(out_h * out_w);
  const bool pointwise = kh == 1 && kw == 1 && out_h == in_h && out_w == in_w;
  const double dense = static_cast<double>(out_channels) * k * p + (pointwise ? 0.0 : kConvMlasIm2col * k * p);
  if (dense <= 0.0) return 1.0;
  // The direct kernel stores through a tile buffer; the SparseMatrix products write in place.
  const double store = (direct ? kConvStore : 1.0) * static_cast<double>(out_channels) * p;
  double sparse;
  if (direct) {
    // Padded sizes for dilation 1 (a dilated conv pads a little more; the model ignores it).
    const int64_t hp = out_h + kh - 1, wp = out_w + kw - 1;
    const int64_t positions = (out_h - 1) * wp + out_w;
    const double tiles = static_cast<double>((positions + detail::kConvTile - 1) / detail::kConvTile);
    sparse = kConvDirectNz * static_cast<double>(nonzeros) * tiles * detail::kConvTile +
             kConvPad * static_cast<double>(in_channels * hp * wp) + store;
  } else {
    sparse = kConvIm2colNz * static_cast<double>(nonzeros) * p + (pointwise ? 0.0 : kConvOurIm2col * k * p) + store;
  }
  return sparse / dense;
}

}  // namespace onnxslim_sparse
