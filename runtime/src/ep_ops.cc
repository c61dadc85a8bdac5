// Gemm / MatMul / Conv on top of the one kernel operation Y = act(alpha * W * X + bias).
//
// The kernels want the activation as X[K x N] with N = batch rows (or output pixels), while
// Gemm/MatMul store it as A[N x K]: the small activation side is transposed in and the result
// transposed out (for N = 1 both are the same memory and nothing moves). A stride-1 Conv runs
// as a direct sparse convolution (SparseConv: one padded copy of the image, no im2col); other
// strides go through an explicit im2col per image, X[C*kh*kw x OH*OW], whose product with the
// filter matrix W[OC x C*kh*kw] is already the NCHW output of that image; 1x1 / stride 1 / no
// pad skips both and multiplies the image itself.
#include "ep_ops.h"

#include "ep_fallback.h"
#include "ep_weight.h"

#include <algorithm>
#include <cstring>

namespace onnxslim_ep {

using onnxslim_sparse::ParallelFor;

namespace {

std::unique_ptr<float[]> Scratch(int64_t n) { return std::unique_ptr<float[]>(new float[std::max<int64_t>(n, 1)]); }

// dst[cols x rows] = src[rows x cols]^T, in cache-sized tiles.
void Transpose(const float* src, int64_t rows, int64_t cols, float* dst, const ParallelFor& parallel) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  auto work = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTile, r1 = std::min(rows, r0 + kTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * cols + c];
      }
    }
  };
  if (parallel && rows * cols >= (1 << 16)) parallel(row_tiles, work); else work(0, row_tiles);
}

[[noreturn]] void Fail(const std::string& msg) { throw Ort::Exception(std::string(msg), ORT_INVALID_ARGUMENT); }

}  // namespace

ParallelFor MakeParallelFor(const OrtKernelContext* ctx) {
  return [ctx](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    // Contiguous chunks, a few per thread so uneven rows still balance; ORT runs them inline
    // when the session has one intra-op thread.
    const int64_t chunks = std::min<int64_t>(n, 64);
    if (chunks == 1) {
      fn(0, n);
      return;
    }
    struct Job {
      const std::function<void(int64_t, int64_t)>* fn;
      int64_t n, chunks;
    } job{&fn, n, chunks};
    auto run_chunk = [](void* data, size_t i) {
      const auto* j = static_cast<const Job*>(data);
      const int64_t begin = j->n * static_cast<int64_t>(i) / j->chunks;
      const int64_t end = j->n * (static_cast<int64_t>(i) + 1) / j->chunks;
      if (end > begin) (*j->fn)(begin, end);
    };
    OrtStatus* status = GetApis().ort->KernelContext_ParallelFor(ctx, run_chunk, static_cast<size_t>(chunks), 0, &job);
    if (status != nullptr) {  // no pool available: nothing ran, do it here
      GetApis().ort->ReleaseStatus(status);
      fn(0, n);
    }
  };
}

AxisPlan PlanConvAxis(int64_t in, int64_t kernel, int64_t stride, int64_t dilation, int64_t pad_begin,
                      int64_t pad_end, const std::string& auto_pad) {
  const int64_t span = (kernel - 1) * dilation + 1;
  AxisPlan plan;
  if (auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER") {
    plan.out = (in + stride - 1) / stride;
    const int64_t total = std::max<int64_t>(0, (plan.out - 1) * stride + span - in);
    plan.pad_begin = auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
  } else if (auto_pad == "VALID") {
    plan.out = (in - span) / stride + 1;
    plan.pad_begin = 0;
  } else {
    plan.out = (in + pad_begin + pad_end - span) / stride + 1;
    plan.pad_begin = pad_begin;
  }
  return plan;
}

void SparseOp::Compute(Ort::KernelContext& ctx) const {
  Ort::ConstValue input = ctx.GetInput(x_input);
  auto info = input.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail(name + ": input is not float32");
  const std::vector<int64_t> shape = info.GetShape();
  const float* x = input.GetTensorData<float>();
  if (kind == OpKind::kConv) {
    ComputeConv(ctx, x, shape);
    return;
  }
  const ParallelFor parallel = MakeParallelFor(ctx.GetOrtKernelContext());
  if (weight_left) {
    ComputeLeft(ctx, x, shape, parallel);
    return;
  }
  const int64_t m = w->rows(), k = w->cols();
  if (kind == OpKind::kGemm) {
    if (shape.size() != 2) Fail(name + ": Gemm input A must be 2-D");
    const int64_t a_k = trans_a ? shape[0] : shape[1], rows = trans_a ? shape[1] : shape[0];
    if (a_k != k) Fail(name + ": Gemm inner dimension " + std::to_string(a_k) + " != weight's " + std::to_string(k));
    float* y = ctx.GetOutput(0, std::vector<int64_t>{rows, m}).GetTensorMutableData<float>();
    if (rows == 0) return;
    if (!trans_a) {
      ComputeRows(ctx, x, rows, k, y, parallel);
      return;
    }
    // A^T is already X[K x rows].
    if (rows == 1) {
      w->Multiply(x, 1, 1, y, 1, alpha, bias.empty() ? nullptr : bias.data(), act, parallel);
      return;
    }
    auto yt = Scratch(m * rows);
    w->Multiply(x, rows, rows, yt.get(), rows, alpha, bias.empty() ? nullptr : bias.data(), act, parallel);
    Transpose(yt.get(), m, rows, y, parallel);
    return;
  }
  // MatMul: A[..., K] x W^T; a 1-D A is one row and drops that axis from the output.
  if (shape.empty() || shape.back() != k) Fail(name + ": MatMul inner dimension does not match the weight");
  std::vector<int64_t> out_shape(shape.begin(), shape.end() - 1);
  out_shape.push_back(m);
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
  if (rows == 0) return;
  ComputeRows(ctx, x, rows, k, y, parallel);
}

std::string SparseOp::Describe() const {
  if (direct)
    return "direct conv " + std::to_string(direct->out_channels()) + "x" + std::to_string(direct->in_channels()) +
           ", " + std::to_string(direct->nonzeros()) + " nonzeros";
  return std::to_string(w->rows()) + "x" + std::to_string(w->cols()) + ", " + std::to_string(w->nonzeros()) +
         " nonzeros, format " + std::to_string(static_cast<int>(w->format()));
}

void SparseOp::ComputeRows(Ort::KernelContext&, const float* a, int64_t rows, int64_t k, float* y,
                           const ParallelFor& parallel) const {
  const float* b = bias.empty() ? nullptr : bias.data();
  const int64_t m = w->rows();
  if (fallback && fallback_for[BucketOf(rows)]) {  // MLAS is expected to be faster for this width
    fallback->Run(a, rows, k, y, m);
    return;
  }
  if (rows == 1) {  // a row vector is also a column vector: no copies
    w->Multiply(a, 1, 1, y, 1, alpha, b, act, parallel);
    return;
  }
  auto xt = Scratch(k * rows);
  Transpose(a, rows, k, xt.get(), parallel);
  auto yt = Scratch(m * rows);
  w->Multiply(xt.get(), rows, rows, yt.get(), rows, alpha, b, act, parallel);
  Transpose(yt.get(), m, rows, y, parallel);
}

// W * x with the constant on the left is the kernels' own orientation: X and Y are the tensors
// themselves (Gemm with transB excepted, whose B^T is the one copy), one product per matrix of a
// batched MatMul.
void SparseOp::ComputeLeft(Ort::KernelContext& ctx, const float* x, const std::vector<int64_t>& shape,
                           const ParallelFor& parallel) const {
  const int64_t m = w->rows(), k = w->cols();
  const float* b = bias.empty() ? nullptr : bias.data();
  if (kind == OpKind::kGemm) {
    if (shape.size() != 2) Fail(name + ": Gemm input B must be 2-D");
    const int64_t b_k = trans_b ? shape[1] : shape[0], n = trans_b ? shape[0] : shape[1];
    if (b_k != k) Fail(name + ": Gemm inner dimension " + std::to_string(b_k) + " != weight's " + std::to_string(k));
    float* y = ctx.GetOutput(0, std::vector<int64_t>{m, n}).GetTensorMutableData<float>();
    if (n == 0 || m == 0) return;
    if (!trans_b || n == 1) {  // B is X[K x N] (a single column reads the same transposed)
      w->Multiply(x, n, n, y, n, alpha, b, act, parallel);
      return;
    }
    auto xt = Scratch(k * n);
    Transpose(x, n, k, xt.get(), parallel);
    w->Multiply(xt.get(), n, n, y, n, alpha, b, act, parallel);
    return;
  }
  // MatMul(W, x): x[..., K, N] -> y[..., M, N]; a 1-D x is one column and drops that axis.
  if (shape.empty()) Fail(name + ": MatMul input must have a rank >= 1");
  if (shape.size() == 1) {
    if (shape[0] != k) Fail(name + ": MatMul inner dimension does not match the weight");
    float* y = ctx.GetOutput(0, std::vector<int64_t>{m}).GetTensorMutableData<float>();
    if (m > 0) w->Multiply(x, 1, 1, y, 1, alpha, b, act, parallel);
    return;
  }
  if (shape[shape.size() - 2] != k) Fail(name + ": MatMul inner dimension does not match the weight");
  const int64_t n = shape.back();
  std::vector<int64_t> out_shape(shape);
  out_shape[shape.size() - 2] = m;
  int64_t matrices = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) matrices *= shape[i];
  float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
  if (matrices == 0 || n == 0 || m == 0) return;
  for (int64_t i = 0; i < matrices; ++i) w->Multiply(x + i * k * n, n, n, y + i * m * n, n, alpha, b, act, parallel);
}

void SparseOp::ComputeConv(Ort::KernelContext& ctx, const float* x, const std::vector<int64_t>& shape) const {
  const int rank = conv.spatial_rank;
  if (static_cast<int>(shape.size()) != rank + 2) Fail(name + ": Conv input rank does not match the weight");
  const int64_t batch = shape[0], channels = shape[1];
  const int64_t in_h = rank == 2 ? shape[2] : 1, in_w = shape[rank + 1];
  const int64_t kh = conv.kernel[0], kw = conv.kernel[1];
  const int64_t in_channels = direct ? direct->in_channels() : w->cols() / (kh * kw);
  if (channels != in_channels) Fail(name + ": Conv input channels do not match the weight");
  const AxisPlan ph = rank == 2 ? PlanConvAxis(in_h, kh, conv.stride[0], conv.dilation[0], conv.pad_begin[0],
                                               conv.pad_end[0], conv.auto_pad)
                                : AxisPlan{1, 0};
  const AxisPlan pw = PlanConvAxis(in_w, kw, conv.stride[1], conv.dilation[1], conv.pad_begin[1], conv.pad_end[1],
                                   conv.auto_pad);
  if (ph.out < 1 || pw.out < 1) Fail(name + ": Conv output would be empty");
  const int64_t m = direct ? direct->out_channels() : w->rows(), pixels = ph.out * pw.out, in_pixels = in_h * in_w;
  std::vector<int64_t> out_shape{batch, m};
  if (rank == 2) out_shape.push_back(ph.out);
  out_shape.push_back(pw.out);
  float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
  if (batch == 0) return;
  const ParallelFor parallel = MakeParallelFor(ctx.GetOrtKernelContext());
  const float* b = bias.empty() ? nullptr : bias.data();

  if (direct) {  // stride 1 (checked when the op was built): no im2col at all
    onnxslim_sparse::ConvGeometry g;
    g.in_h = in_h;
    g.in_w = in_w;
    g.dil_h = conv.dilation[0];
    g.dil_w = conv.dilation[1];
    g.pad_top = ph.pad_begin;
    g.pad_left = pw.pad_begin;
    g.out_h = ph.out;
    g.out_w = pw.out;
    direct->Run(x, batch, g, y, b, act, parallel);
    return;
  }
  const bool pointwise = kh == 1 && kw == 1 && conv.stride[0] == 1 && conv.stride[1] == 1 && ph.pad_begin == 0 &&
                         pw.pad_begin == 0 && ph.out == in_h && pw.out == in_w;
  std::unique_ptr<float[]> cols;
  if (!pointwise) cols = Scratch(w->cols() * pixels);
  for (int64_t n = 0; n < batch; ++n) {
    const float* image = x + n * channels * in_pixels;
    const float* xcol = image;
    if (!pointwise) {
      float* col = cols.get();
      // Row r = (c, i, j) of the column matrix holds input pixel (oh*sh - pad + i*dh, ow*sw - pad + j*dw)
      // of channel c for every output pixel, zero outside the image.
      auto fill = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = r / (kh * kw), i = (r / kw) % kh, j = r % kw;
          const float* plane = image + c * in_pixels;
          float* dst = col + r * pixels;
          for (int64_t oh = 0; oh < ph.out; ++oh) {
            const int64_t ih = oh * conv.stride[0] - ph.pad_begin + i * conv.dilation[0];
            float* row_out = dst + oh * pw.out;
            if (ih < 0 || ih >= in_h) {
              std::memset(row_out, 0, sizeof(float) * pw.out);
              continue;
            }
            const float* row_in = plane + ih * in_w;
            const int64_t base = j * conv.dilation[1] - pw.pad_begin, sw = conv.stride[1];
            for (int64_t ow = 0; ow < pw.out; ++ow) {
              const int64_t iw = ow * sw + base;
              row_out[ow] = (iw >= 0 && iw < in_w) ? row_in[iw] : 0.0f;
            }
          }
        }
      };
      parallel(w->cols(), fill);
      xcol = col;
    }
    w->Multiply(xcol, pixels, pixels, y + n * m * pixels, pixels, 1.0f, b, act, parallel);
  }
  onnxslim_sparse::CountConvPathRun(pointwise ? 2 : 1, batch);
}

}  // namespace onnxslim_ep
