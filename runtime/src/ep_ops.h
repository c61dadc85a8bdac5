// A claimed node after compilation: the weight held sparse plus what the op needs to turn its
// input into the kernel's one operation Y = act(alpha * W * X + bias) (sparse_kernels.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <array>

#include "ep_common.h"
#include "sparse_kernels.h"

namespace onnxslim_ep {

enum class OpKind { kGemm, kMatMul, kConv };

class DenseFallback;  // ep_fallback.h

// Conv attributes in ONNX terms, 1-D convs stored as 2-D with a height of 1.
struct ConvAttrs {
  int64_t kernel[2] = {1, 1};
  int64_t stride[2] = {1, 1};
  int64_t dilation[2] = {1, 1};
  int64_t pad_begin[2] = {0, 0};
  int64_t pad_end[2] = {0, 0};
  std::string auto_pad = "NOTSET";  // NOTSET | SAME_UPPER | SAME_LOWER | VALID
  int spatial_rank = 2;             // 1 or 2
};

struct SparseOp {
  OpKind kind = OpKind::kGemm;
  std::string name;                                   // the ONNX node's name (for messages)
  std::unique_ptr<onnxslim_sparse::SparseMatrix> w;   // M x K: out features x in features (im2col / pointwise / Gemm / MatMul)
  std::unique_ptr<onnxslim_sparse::SparseConv> direct;  // Conv with stride 1 run as a direct sparse conv (then w is null)
  std::vector<float> bias;                            // M values, or empty
  float alpha = 1.0f;
  bool trans_a = false;                               // Gemm only: A is stored K x batch
  bool trans_b = false;                               // Gemm with a constant A only: B is stored N x K
  bool weight_left = false;                           // W * x: the constant is Gemm's A / MatMul's first input
  std::shared_ptr<const DenseFallback> fallback;      // ORT's MLAS for x * W, or null
  std::array<bool, 3> fallback_for{};                 // per column regime (ep_weight.h BucketOf): run MLAS
  onnxslim_sparse::Activation act = onnxslim_sparse::Activation::kNone;
  ConvAttrs conv;
  size_t x_input = 0;                                 // index of the activation among the fused node's inputs

  // Reads the activation from the kernel context, writes the op's output 0.
  void Compute(Ort::KernelContext& ctx) const;
  // "MxK, N nonzeros, format F" or "direct conv OCxC, N nonzeros" (for the EP's log).
  std::string Describe() const;

 private:
  void ComputeRows(Ort::KernelContext& ctx, const float* a, int64_t rows, int64_t k, float* y,
                   const onnxslim_sparse::ParallelFor& parallel) const;
  void ComputeLeft(Ort::KernelContext& ctx, const float* x, const std::vector<int64_t>& shape,
                   const onnxslim_sparse::ParallelFor& parallel) const;
  void ComputeConv(Ort::KernelContext& ctx, const float* x, const std::vector<int64_t>& x_shape) const;
};

// Output size and leading pad of one spatial axis, exactly as ONNX (and ORT's Conv) define them.
struct AxisPlan {
  int64_t out = 0;
  int64_t pad_begin = 0;
};
AxisPlan PlanConvAxis(int64_t in, int64_t kernel, int64_t stride, int64_t dilation, int64_t pad_begin,
                      int64_t pad_end, const std::string& auto_pad);

// ParallelFor over ORT's intra-op thread pool of this run (serial when it has one thread).
onnxslim_sparse::ParallelFor MakeParallelFor(const OrtKernelContext* ctx);

}  // namespace onnxslim_ep
