// ORT's own dense kernel (MLAS) for the runs of a claimed x * W layer where it beats every sparse
// format: a layer claimed for batch 1 at 50-60 % zeros loses to MLAS at batch 8 or 32 (see
// docs/sparse_runtime.md, "Formats per batch width"), and the plugin API gives an EP no access
// to ORT's kernels. So the EP builds a one-node model (Gemm [+ Relu]) with the Model Editor API
// and runs it in a private ORT session: MLAS with a dense copy of the weight, only for the
// layers and column regimes where the cost model expects MLAS to win.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "ep_common.h"
#include "ep_weight.h"

namespace onnxslim_ep {

// Expected time of ORT's dense Gemm per weight in ChooseFormat's units (one CSR nonzero = 1),
// for N = 1 and per 8-column vector for N = 2..8 and > 8: fitted to bench/sparse_formats.py /
// bench/sparse.py medians of the EP's CSR vs ORT's MLAS on vgg16_fc6, vgg16_fc7 and the ddddocr
// Gemm at 50-70 % zeros, one thread (speedup * nonzero share; medians over the three shapes).
constexpr std::array<double, kBuckets> kMlasCostPerWeight = {0.5, 0.29, 0.35};

// True when the sparse format is expected to lose to MLAS for products of bucket b's width.
bool MlasWins(const onnxslim_sparse::FormatCounts& counts, onnxslim_sparse::Format format, int bucket);

class DenseFallback {
 public:
  // weight: ORT's tensor as stored (K x M, or M x K when trans_b); bias: M values or empty.
  DenseFallback(const float* weight, int64_t dim0, int64_t dim1, bool trans_b, const std::vector<float>& bias,
                float alpha, bool relu, int threads);
  // y[rows x M] = act(alpha * x[rows x K] * W + bias), same as the sparse op.
  void Run(const float* x, int64_t rows, int64_t k, float* y, int64_t m) const;

 private:
  Ort::Env env_{nullptr};
  Ort::Session session_{nullptr};
};

}  // namespace onnxslim_ep
