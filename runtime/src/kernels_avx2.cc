// AVX2+FMA inner loops. The target pragma (instead of -mavx2 on the command line) lets the whole
// library build with one plain `g++ -O3` line; kernels_matrix.cc only calls into this file after
// __builtin_cpu_supports said yes. Everything here has internal linkage except Avx2Kernels(), and
// no standard-library header is included after the pragma (see kernels_internal.h for why).
#include <cstdint>

#include "kernels_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace onnxslim_sparse {
namespace detail {
namespace {

struct Finisher {
  __m256 alpha, bias, zero;
  float alpha_s, bias_s;
  bool relu;
  Finisher(const Epilogue& ep, int64_t row)
      : alpha(_mm256_set1_ps(ep.alpha)),
        bias(_mm256_set1_ps(ep.bias ? ep.bias[row] : 0.0f)),
        zero(_mm256_setzero_ps()),
        alpha_s(ep.alpha),
        bias_s(ep.bias ? ep.bias[row] : 0.0f),
        relu(ep.relu) {}
  // max(0, r) keeps a NaN r as NaN (MAXPS returns its second operand when either is NaN).
  __m256 operator()(__m256 acc) const {
    const __m256 r = _mm256_fmadd_ps(alpha, acc, bias);
    return relu ? _mm256_max_ps(zero, r) : r;
  }
  float operator()(float acc) const {
    const float r = __builtin_fmaf(alpha_s, acc, bias_s);
    return relu && r < 0.0f ? 0.0f : r;
  }
};

inline __m256i TailMask(int64_t rem) {  // lanes [0, rem) set, 0 < rem < 8
  alignas(32) static const int32_t kTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTable + 8 - rem));
}

inline float HorizontalSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// The entries of one output row: entry e has value val(e) and multiplies X row xrow(e). Rows are
// stored as blocks of BW consecutive columns (CSR: BW = 1); kDense = every column, no index.
template <int BW, bool kDense, class Index>
struct RowEntries {
  const float* vals;  // first value of the row
  const Index* cols;  // first block index of the row
  const float* x;
  int64_t ldx, count;
  const float* val(int64_t e) const { return vals + e; }
  const float* xrow(int64_t e) const {
    const int64_t col = kDense ? e : static_cast<int64_t>(cols[e / BW]) + e % BW;
    return x + col * ldx;
  }
};

// One output row over columns [c0, c1): tiles of 64, 32 and 8 columns, then a masked tail. The
// FMA latency (4 cycles) rather than the loads limits a single chain per register, so narrower
// tiles split the entries over 2 (32 columns) or 4 (8 columns) partial sums: 8 or 4 independent
// chains in flight. Which tile computes a column depends only on its position in the 64-column
// block (kernels_matrix.cc), never on the thread split, so results stay bit-identical.
template <int BW, bool kDense, class Index>
void RowProduct(const SparseView& w, const Index* cols, const Operands& io, const Finisher& fin, int64_t i,
                int64_t c0, int64_t c1) {
  const int64_t b0 = kDense ? 0 : w.ptr[i], b1 = kDense ? w.cols : w.ptr[i + 1];
  const RowEntries<BW, kDense, Index> r{kDense ? w.val + i * w.cols : w.val + b0 * BW, kDense ? nullptr : cols + b0,
                                        io.x, io.ldx, (b1 - b0) * BW};
  float* yr = io.y + i * io.ldy;
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) {
    __m256 a[8];
    for (auto& v : a) v = _mm256_setzero_ps();
    for (int64_t e = 0; e < r.count; ++e) {
      const __m256 v = _mm256_broadcast_ss(r.val(e));
      const float* xr = r.xrow(e) + c;
      for (int q = 0; q < 8; ++q) a[q] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * q), a[q]);
    }
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(yr + c + 8 * q, fin(a[q]));
  }
  for (; c + 32 <= c1; c += 32) {
    __m256 a[4], b[4];
    for (int q = 0; q < 4; ++q) a[q] = b[q] = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 2 <= r.count; e += 2) {
      const __m256 v0 = _mm256_broadcast_ss(r.val(e)), v1 = _mm256_broadcast_ss(r.val(e + 1));
      const float *x0 = r.xrow(e) + c, *x1 = r.xrow(e + 1) + c;
      for (int q = 0; q < 4; ++q) {
        a[q] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x0 + 8 * q), a[q]);
        b[q] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x1 + 8 * q), b[q]);
      }
    }
    if (e < r.count) {
      const __m256 v0 = _mm256_broadcast_ss(r.val(e));
      const float* x0 = r.xrow(e) + c;
      for (int q = 0; q < 4; ++q) a[q] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x0 + 8 * q), a[q]);
    }
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(yr + c + 8 * q, fin(_mm256_add_ps(a[q], b[q])));
  }
  for (; c < c1; c += 8) {
    const bool partial = c + 8 > c1;
    const __m256i mask = partial ? TailMask(c1 - c) : _mm256_set1_epi32(-1);
    const auto load = [&](const float* p) { return partial ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p); };
    __m256 a[4];
    for (auto& v : a) v = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 4 <= r.count; e += 4)
      for (int q = 0; q < 4; ++q)
        a[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(r.val(e + q)), load(r.xrow(e + q) + c), a[q]);
    for (; e < r.count; ++e) a[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(r.val(e)), load(r.xrow(e) + c), a[0]);
    const __m256 v = fin(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    if (partial) {
      _mm256_maskstore_ps(yr + c, mask, v);
    } else {
      _mm256_storeu_ps(yr + c, v);
    }
  }
}

// Batch-1 products (one column, contiguous x): the cases that decide FC latency. Two vector
// accumulators hide the FMA latency; the loads of W dominate (memory bound). For CSR the
// hardware gather measured faster than 4 scalar FMA chains on the bench machine (AMD EPYC,
// 25088x4096 at 90 %: 1.8x vs 1.5x dense in one interleaved run).
inline __m256i LoadIndices(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i LoadIndices(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <class Index>
float CsrDot(const SparseView& w, const Index* cols, const float* x, int64_t i) {
  int64_t b = w.ptr[i];
  const int64_t b1 = w.ptr[i + 1];
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; b + 16 <= b1; b += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + b), _mm256_i32gather_ps(x, LoadIndices(cols + b), 4), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + b + 8), _mm256_i32gather_ps(x, LoadIndices(cols + b + 8), 4), a1);
  }
  if (b + 8 <= b1) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + b), _mm256_i32gather_ps(x, LoadIndices(cols + b), 4), a0);
    b += 8;
  }
  float s = HorizontalSum(_mm256_add_ps(a0, a1));
  for (; b < b1; ++b) s = __builtin_fmaf(w.val[b], x[cols[b]], s);
  return s;
}

float Block1x4Dot(const SparseView& w, const int32_t*, const float* x, int64_t i) {
  int64_t b = w.ptr[i];
  const int64_t b1 = w.ptr[i + 1];
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; b + 4 <= b1; b += 4) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + 4 * b), _mm256_loadu2_m128(x + w.col[b + 1], x + w.col[b]), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + 4 * b + 8), _mm256_loadu2_m128(x + w.col[b + 3], x + w.col[b + 2]),
                         a1);
  }
  for (; b + 2 <= b1; b += 2)
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + 4 * b), _mm256_loadu2_m128(x + w.col[b + 1], x + w.col[b]), a0);
  a0 = _mm256_add_ps(a0, a1);
  if (b < b1) {
    const __m128 last = _mm_mul_ps(_mm_loadu_ps(w.val + 4 * b), _mm_loadu_ps(x + w.col[b]));
    a0 = _mm256_add_ps(a0, _mm256_zextps128_ps256(last));
  }
  return HorizontalSum(a0);
}

float DenseDot(const SparseView& w, const int32_t*, const float* x, int64_t i) {
  const float* wr = w.val + i * w.cols;
  const int64_t k = w.cols;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j + 16), _mm256_loadu_ps(x + j + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j + 24), _mm256_loadu_ps(x + j + 24), a3);
  }
  for (; j + 8 <= k; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j), _mm256_loadu_ps(x + j), a0);
  float s = HorizontalSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; j < k; ++j) s = __builtin_fmaf(wr[j], x[j], s);
  return s;
}

template <int BW, bool kDense, class Index, float (*Dot)(const SparseView&, const Index*, const float*, int64_t)>
void RowsKernel(const SparseView& w, const Index* cols, const Operands& io, const Epilogue& ep, const Tile& t) {
  const bool vector_1 = t.col1 - t.col0 == 1 && io.ldx == 1;
  for (int64_t i = t.row0; i < t.row1; ++i) {
    const Finisher fin(ep, i);
    if (vector_1) {
      io.y[i * io.ldy + t.col0] = fin(Dot(w, cols, io.x + t.col0, i));
    } else {
      RowProduct<BW, kDense>(w, cols, io, fin, i, t.col0, t.col1);
    }
  }
}

void Csr(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  if (w.col16) {
    RowsKernel<1, false, uint16_t, CsrDot<uint16_t>>(w, w.col16, io, ep, t);
  } else {
    RowsKernel<1, false, int32_t, CsrDot<int32_t>>(w, w.col, io, ep, t);
  }
}
void Block1x4(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  RowsKernel<4, false, int32_t, Block1x4Dot>(w, w.col, io, ep, t);
}
void Dense(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  RowsKernel<1, true, int32_t, DenseDot>(w, w.col, io, ep, t);
}

// 4x1: one X row feeds four output rows, so X loads are shared by the strip.
void Block4x1Strip(const SparseView& w, const Operands& io, const Epilogue& ep, int64_t r0, int64_t rn, int64_t c0,
                   int64_t c1) {
  const int64_t s = r0 / 4, b0 = w.ptr[s], b1 = w.ptr[s + 1];
  int64_t c = c0;
  if (c1 - c0 == 1 && io.ldx == 1) {  // batch 1: two blocks per vector (4 rows each)
    const float* x = io.x + c0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t b = b0;
    for (; b + 4 <= b1; b += 4) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + 4 * b),
                           _mm256_set_m128(_mm_broadcast_ss(x + w.col[b + 1]), _mm_broadcast_ss(x + w.col[b])), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + 4 * b + 8),
                           _mm256_set_m128(_mm_broadcast_ss(x + w.col[b + 3]), _mm_broadcast_ss(x + w.col[b + 2])), a1);
    }
    for (; b + 2 <= b1; b += 2)
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.val + 4 * b),
                           _mm256_set_m128(_mm_broadcast_ss(x + w.col[b + 1]), _mm_broadcast_ss(x + w.col[b])), a0);
    a0 = _mm256_add_ps(a0, a1);
    __m128 acc = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    if (b < b1) acc = _mm_fmadd_ps(_mm_loadu_ps(w.val + 4 * b), _mm_broadcast_ss(x + w.col[b]), acc);
    alignas(16) float r4[4];
    _mm_store_ps(r4, acc);
    for (int64_t r = 0; r < rn; ++r) io.y[(r0 + r) * io.ldy + c0] = Finisher(ep, r0 + r)(r4[r]);
    return;
  }
  for (; c + 16 <= c1; c += 16) {
    __m256 a[4][2];
    for (auto& row : a) row[0] = row[1] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = io.x + static_cast<int64_t>(w.col[b]) * io.ldx + c;
      const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
      for (int r = 0; r < 4; ++r) {
        const __m256 v = _mm256_broadcast_ss(w.val + 4 * b + r);
        a[r][0] = _mm256_fmadd_ps(v, x0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(v, x1, a[r][1]);
      }
    }
    for (int64_t r = 0; r < rn; ++r) {
      const Finisher fin(ep, r0 + r);
      _mm256_storeu_ps(io.y + (r0 + r) * io.ldy + c, fin(a[r][0]));
      _mm256_storeu_ps(io.y + (r0 + r) * io.ldy + c + 8, fin(a[r][1]));
    }
  }
  for (; c < c1; c += 8) {
    const bool partial = c + 8 > c1;
    const __m256i mask = partial ? TailMask(c1 - c) : _mm256_set1_epi32(-1);
    __m256 a[4];
    for (auto& v : a) v = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = io.x + static_cast<int64_t>(w.col[b]) * io.ldx + c;
      const __m256 x0 = partial ? _mm256_maskload_ps(xr, mask) : _mm256_loadu_ps(xr);
      for (int r = 0; r < 4; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w.val + 4 * b + r), x0, a[r]);
    }
    for (int64_t r = 0; r < rn; ++r) {
      const __m256 v = Finisher(ep, r0 + r)(a[r]);
      if (partial) {
        _mm256_maskstore_ps(io.y + (r0 + r) * io.ldy + c, mask, v);
      } else {
        _mm256_storeu_ps(io.y + (r0 + r) * io.ldy + c, v);
      }
    }
  }
}

void Block4x1(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t) {
  for (int64_t r0 = t.row0; r0 < t.row1; r0 += 4)
    Block4x1Strip(w, io, ep, r0, t.row1 - r0 < 4 ? t.row1 - r0 : 4, t.col0, t.col1);
}


// Direct sparse conv: 8 accumulators = 64 consecutive positions of one output channel; per
// nonzero one broadcast and 8 unaligned loads at a constant shift, each fused into an FMA.
// Input-channel block outer, output channel inner (see DirectConvArgs): the block's slice of
// the padded image stays in L1 across all the filters of the unit.
void DirectConv(const DirectConvArgs& a, int64_t p0, int64_t o0, int64_t o1, float* acc) {
  alignas(32) float buf[kConvTile];
  const float* in = a.in + p0;
  const __m256 zero = _mm256_setzero_ps();
  const int64_t stride = a.blocks + 1;
  for (int64_t blk = 0; blk < a.blocks; ++blk) {
    const bool first = blk == 0, last = blk + 1 == a.blocks;
    for (int64_t o = o0; o < o1; ++o) {
      float* part = acc + (o - o0) * kConvTile;
      __m256 c0 = zero, c1 = zero, c2 = zero, c3 = zero, c4 = zero, c5 = zero, c6 = zero, c7 = zero;
      if (!first) {
        c0 = _mm256_load_ps(part);
        c1 = _mm256_load_ps(part + 8);
        c2 = _mm256_load_ps(part + 16);
        c3 = _mm256_load_ps(part + 24);
        c4 = _mm256_load_ps(part + 32);
        c5 = _mm256_load_ps(part + 40);
        c6 = _mm256_load_ps(part + 48);
        c7 = _mm256_load_ps(part + 56);
      }
      for (int64_t j = a.ptr[o * stride + blk], end = a.ptr[o * stride + blk + 1]; j < end; ++j) {
        const __m256 v = _mm256_broadcast_ss(a.val + j);
        const float* s = in + a.off[j];
        c0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s), c0);
        c1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 8), c1);
        c2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 16), c2);
        c3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 24), c3);
        c4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 32), c4);
        c5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 40), c5);
        c6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 48), c6);
        c7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(s + 56), c7);
      }
      float* dst = part;
      if (last) {
        const __m256 b = _mm256_set1_ps(a.bias ? a.bias[o] : 0.0f);
        const auto fin = [&](__m256 x) {
          const __m256 r = _mm256_add_ps(x, b);
          return a.relu ? _mm256_max_ps(zero, r) : r;  // MAXPS keeps a NaN r (second operand)
        };
        c0 = fin(c0), c1 = fin(c1), c2 = fin(c2), c3 = fin(c3);
        c4 = fin(c4), c5 = fin(c5), c6 = fin(c6), c7 = fin(c7);
        dst = buf;
      }
      _mm256_store_ps(dst, c0);
      _mm256_store_ps(dst + 8, c1);
      _mm256_store_ps(dst + 16, c2);
      _mm256_store_ps(dst + 24, c3);
      _mm256_store_ps(dst + 32, c4);
      _mm256_store_ps(dst + 40, c5);
      _mm256_store_ps(dst + 48, c6);
      _mm256_store_ps(dst + 56, c7);
      if (last) StoreConvTile(a, o, p0, buf);
    }
  }
}

}  // namespace

const KernelSet& Avx2Kernels() {
  static const KernelSet kSet{Csr, Block1x4, Block4x1, Dense, DirectConv};
  return kSet;
}

}  // namespace detail
}  // namespace onnxslim_sparse

#else  // not x86: the portable loops are the only ones; kernels_matrix.cc never selects these.

namespace onnxslim_sparse {
namespace detail {
const KernelSet& Avx2Kernels() { return PortableKernels(); }
}  // namespace detail
}  // namespace onnxslim_sparse

#endif
