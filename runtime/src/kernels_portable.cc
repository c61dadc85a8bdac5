// Portable inner loops: plain C++ the compiler vectorises for the baseline ISA. Used on CPUs
// without AVX2/FMA and when the portable path is forced (tests of both paths).
#include <algorithm>
#include <vector>

#include "kernels_internal.h"

namespace onnxslim_sparse {
namespace detail {
namespace {

inline float Finish(float acc, const Epilogue& ep, int64_t row) {
  float v = ep.alpha * acc + (ep.bias ? ep.bias[row] : 0.0f);
  return ep.relu && v < 0.0f ? 0.0f : v;
}

// Rows laid out as blocks of BW consecutive columns (CSR: BW = 1); `dense` = every column, in order.
// Batch 1 (one contiguous column of X): per-row dot products with four independent sums, so
// the loop is not bound by the latency of one add chain (5x faster than the general loop).
template <int BW, class Index>
float RowDot(const SparseView& w, const Index* cols, const float* x, int64_t i, bool dense) {
  const int64_t b0 = dense ? 0 : w.ptr[i], b1 = dense ? w.cols : w.ptr[i + 1];
  const float* vals = dense ? w.val + i * w.cols : w.val + b0 * BW;
  const int64_t count = (b1 - b0) * BW;
  const auto col = [&](int64_t e) { return dense ? e : static_cast<int64_t>(cols[b0 + e / BW]) + e % BW; };
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int64_t e = 0;
  for (; e + 4 <= count; e += 4) {
    s0 += vals[e] * x[col(e)];
    s1 += vals[e + 1] * x[col(e + 1)];
    s2 += vals[e + 2] * x[col(e + 2)];
    s3 += vals[e + 3] * x[col(e + 3)];
  }
  for (; e < count; ++e) s0 += vals[e] * x[col(e)];
  return (s0 + s1) + (s2 + s3);
}

template <int BW, class Index>
void RowBlocks(const SparseView& w, const Index* cols, const Operands& io, const Epilogue& ep, const Tile& t,
               bool dense) {
  const int64_t width = t.col1 - t.col0;
  if (width == 1 && io.ldx == 1) {
    for (int64_t i = t.row0; i < t.row1; ++i)
      io.y[i * io.ldy + t.col0] = Finish(RowDot<BW>(w, cols, io.x + t.col0, i, dense), ep, i);
    return;
  }
  std::vector<float> acc(static_cast<size_t>(width));
  for (int64_t i = t.row0; i < t.row1; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t b0 = dense ? 0 : w.ptr[i], b1 = dense ? w.cols : w.ptr[i + 1];
    const float* vals = dense ? w.val + i * w.cols : w.val;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = dense ? b : static_cast<int64_t>(cols[b]);
      for (int k = 0; k < BW; ++k) {
        const float v = dense ? vals[b] : vals[b * BW + k];
        const float* xr = io.x + (c + k) * io.ldx + t.col0;
        for (int64_t j = 0; j < width; ++j) acc[j] += v * xr[j];
      }
    }
    float* yr = io.y + i * io.ldy + t.col0;
    for (int64_t j = 0; j < width; ++j) yr[j] = Finish(acc[j], ep, i);
  }
}

void Csr(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  if (w.col16) {
    RowBlocks<1>(w, w.col16, io, ep, t, false);
  } else {
    RowBlocks<1>(w, w.col, io, ep, t, false);
  }
}
void Block1x4(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  RowBlocks<4>(w, w.col, io, ep, t, false);
}
void Dense(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  RowBlocks<1>(w, w.col, io, ep, t, true);
}

void Block4x1(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  const int64_t width = t.col1 - t.col0;
  std::vector<float> acc(static_cast<size_t>(4 * width));
  for (int64_t r0 = t.row0; r0 < t.row1; r0 += 4) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t s = r0 / 4;
    for (int64_t b = w.ptr[s]; b < w.ptr[s + 1]; ++b) {
      const float* xr = io.x + static_cast<int64_t>(w.col[b]) * io.ldx + t.col0;
      for (int r = 0; r < 4; ++r) {
        const float v = w.val[b * 4 + r];
        float* a = acc.data() + r * width;
        for (int64_t j = 0; j < width; ++j) a[j] += v * xr[j];
      }
    }
    for (int r = 0; r < 4 && r0 + r < t.row1; ++r) {
      float* yr = io.y + (r0 + r) * io.ldy + t.col0;
      for (int64_t j = 0; j < width; ++j) yr[j] = Finish(acc[r * width + j], ep, r0 + r);
    }
  }
}


// Direct sparse conv (see kernels_avx2.cc and DirectConvArgs): one tile of kConvTile positions
// per output channel, the accumulator row a plain array the compiler vectorises.
void DirectConv(const DirectConvArgs& a, int64_t p0, int64_t o0, int64_t o1, float* acc) {
  const float* in = a.in + p0;
  const int64_t stride = a.blocks + 1;
  for (int64_t blk = 0; blk < a.blocks; ++blk) {
    for (int64_t o = o0; o < o1; ++o) {
      float* part = acc + (o - o0) * kConvTile;
      if (blk == 0)
        for (int64_t t = 0; t < kConvTile; ++t) part[t] = 0.0f;
      for (int64_t j = a.ptr[o * stride + blk], end = a.ptr[o * stride + blk + 1]; j < end; ++j) {
        const float v = a.val[j];
        const float* s = in + a.off[j];
        for (int64_t t = 0; t < kConvTile; ++t) part[t] += v * s[t];
      }
      if (blk + 1 < a.blocks) continue;
      const float b = a.bias ? a.bias[o] : 0.0f;
      for (int64_t t = 0; t < kConvTile; ++t) {
        const float r = part[t] + b;
        part[t] = a.relu && r < 0.0f ? 0.0f : r;
      }
      StoreConvTile(a, o, p0, part);
    }
  }
}

}  // namespace

const KernelSet& PortableKernels() {
  static const KernelSet kSet{Csr, Block1x4, Block4x1, Dense, DirectConv};
  return kSet;
}

}  // namespace detail
}  // namespace onnxslim_sparse
