// The SparseMatrix formats of sparse_kernels.h: building them from a dense weight, the cost
// model behind ChooseFormat, the split of a product into units for ParallelFor, and the
// run-time choice between the AVX2+FMA and the portable inner loops.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels_internal.h"
#include "sparse_kernels.h"

namespace onnxslim_sparse {
namespace detail {

// -1: not decided yet, 0: portable, 1: avx2+fma.
static std::atomic<int> g_isa{-1};

static bool CpuHasAvx2Fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static int ActiveIsa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("ONNXSLIM_SPARSE_ISA");
    const bool forced_portable = env && std::strcmp(env, "portable") == 0;
    isa = (!forced_portable && CpuHasAvx2Fma()) ? 1 : 0;
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

// "portable" forces the portable loops, "auto" the best this CPU has, "avx2+fma" demands AVX2.
// Returns false for an unknown name or an ISA the CPU lacks (nothing changes then).
bool SetKernelIsa(const char* name) {
  if (std::strcmp(name, "portable") == 0) {
    g_isa.store(0);
  } else if (std::strcmp(name, "auto") == 0) {
    g_isa.store(CpuHasAvx2Fma() ? 1 : 0);
  } else if (std::strcmp(name, "avx2+fma") == 0) {
    if (!CpuHasAvx2Fma()) return false;
    g_isa.store(1);
  } else {
    return false;
  }
  return true;
}

const KernelSet& ActiveKernels() { return ActiveIsa() == 1 ? Avx2Kernels() : PortableKernels(); }
static const KernelSet& Kernels() { return ActiveKernels(); }

namespace {

// Counts of what each format would store for this weight; shared by FromDense and the cost model.
struct Layout {
  std::vector<int64_t> ptr;
  std::vector<int32_t> col;
  std::vector<uint16_t> col16;
  std::vector<float> val;
};

Layout BuildCsr(const float* w, int64_t m, int64_t k) {
  Layout l;
  l.ptr.reserve(m + 1);
  l.ptr.push_back(0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const float v = w[i * k + j];
      if (v != 0.0f) {
        l.col.push_back(static_cast<int32_t>(j));
        l.val.push_back(v);
      }
    }
    l.ptr.push_back(static_cast<int64_t>(l.col.size()));
  }
  if (k <= 65536) {  // batch-1 products stream W: narrower indices are directly less time
    l.col16.assign(l.col.begin(), l.col.end());
    l.col = std::vector<int32_t>();
  }
  return l;
}

// 1x4 blocks start at the first uncovered nonzero, moved left when needed so that the block
// ends inside the row (col + 4 <= k; k >= 4 is required). Columns moved over were either
// covered by the previous block or zero, so they are stored as zero here.
Layout BuildBlock1x4(const float* w, int64_t m, int64_t k) {
  Layout l;
  l.ptr.push_back(0);
  for (int64_t i = 0; i < m; ++i) {
    const float* row = w + i * k;
    for (int64_t j = 0; j < k;) {
      if (row[j] == 0.0f) {
        ++j;
        continue;
      }
      const int64_t c = std::min(j, k - 4);
      l.col.push_back(static_cast<int32_t>(c));
      for (int64_t t = 0; t < 4; ++t) l.val.push_back(c + t >= j ? row[c + t] : 0.0f);
      j = c + 4;
    }
    l.ptr.push_back(static_cast<int64_t>(l.col.size()));
  }
  return l;
}

Layout BuildBlock4x1(const float* w, int64_t m, int64_t k) {
  Layout l;
  l.ptr.push_back(0);
  for (int64_t r0 = 0; r0 < m; r0 += 4) {
    const int64_t rn = std::min<int64_t>(4, m - r0);
    for (int64_t j = 0; j < k; ++j) {
      bool any = false;
      for (int64_t r = 0; r < rn; ++r) any |= w[(r0 + r) * k + j] != 0.0f;
      if (!any) continue;
      l.col.push_back(static_cast<int32_t>(j));
      for (int64_t r = 0; r < 4; ++r) l.val.push_back(r < rn ? w[(r0 + r) * k + j] : 0.0f);
    }
    l.ptr.push_back(static_cast<int64_t>(l.col.size()));
  }
  return l;
}

class StoredMatrix final : public SparseMatrix {
 public:
  StoredMatrix(Format f, int64_t m, int64_t k, Layout l, int64_t nnz)
      : format_(f), rows_(m), cols_(k), layout_(std::move(l)), nnz_(nnz) {}

  Format format() const override { return format_; }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  int64_t nonzeros() const override { return nnz_; }
  size_t bytes() const override {
    return layout_.ptr.size() * sizeof(int64_t) + layout_.col.size() * sizeof(int32_t) +
           layout_.col16.size() * sizeof(uint16_t) + layout_.val.size() * sizeof(float);
  }

  void Multiply(const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, float alpha, const float* bias,
                Activation act, const ParallelFor& parallel) const override;

 private:
  Format format_;
  int64_t rows_, cols_;
  Layout layout_;
  int64_t nnz_;
};

void StoredMatrix::Multiply(const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, float alpha,
                            const float* bias, Activation act, const ParallelFor& parallel) const {
  if (n < 1 || ldx < n || ldy < n) throw std::invalid_argument("Multiply: need n >= 1, ldx >= n and ldy >= n");
  if (rows_ == 0) return;
  const SparseView view{layout_.ptr.data(), layout_.col.empty() ? nullptr : layout_.col.data(),
                        layout_.col16.empty() ? nullptr : layout_.col16.data(), layout_.val.data(), rows_, cols_};
  const Epilogue ep{alpha, bias, act == Activation::kRelu};
  const KernelSet& ks = Kernels();
  TileKernel kernel = format_ == Format::kCSR        ? ks.csr
                      : format_ == Format::kBlock1x4 ? ks.block1x4
                      : format_ == Format::kBlock4x1 ? ks.block4x1
                                                     : ks.dense;
  // Units: row blocks (multiples of 4 rows, for 4x1 strips) x column blocks of 64 (a multiple of
  // the widest vector tile), about 128 of them so a pool of any size balances. Units run column
  // block by column block, so one chunk of units reuses the same 64-column slab of X (K x 64
  // floats, in L2 for K up to ~2k) across all its rows instead of streaming all of X per row.
  const int64_t col_block = n <= 64 ? n : 64;
  const int64_t col_units = (n + col_block - 1) / col_block;
  const int64_t row_units_wanted = std::max<int64_t>(1, 128 / col_units);
  int64_t row_block = (rows_ + row_units_wanted - 1) / row_units_wanted;
  row_block = std::max<int64_t>(4, (row_block + 3) / 4 * 4);
  const int64_t row_units = (rows_ + row_block - 1) / row_block;
  const Operands io{x, ldx, y, ldy};
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t ci = u / row_units, ri = u % row_units;
      const Tile t{ri * row_block, std::min(rows_, (ri + 1) * row_block), ci * col_block,
                   std::min(n, (ci + 1) * col_block)};
      kernel(view, io, ep, t);
    }
  };
  if (parallel) {
    parallel(row_units * col_units, run);
  } else {
    run(0, row_units * col_units);
  }
}

int64_t CountNonzeros(const float* w, int64_t m, int64_t k) {
  int64_t nnz = 0;
  for (int64_t i = 0; i < m * k; ++i) nnz += w[i] != 0.0f;
  return nnz;
}

}  // namespace
}  // namespace detail

std::unique_ptr<SparseMatrix> SparseMatrix::FromDense(const float* w, int64_t rows, int64_t cols, Format format) {
  using namespace detail;
  if (rows < 0 || cols < 0 || (rows * cols > 0 && w == nullptr))
    throw std::invalid_argument("FromDense: need rows >= 0, cols >= 0 and weights");
  if (cols > INT32_MAX) throw std::invalid_argument("FromDense: more than 2^31 columns");
  const int64_t nnz = CountNonzeros(w, rows, cols);
  Layout l;
  switch (format) {
    case Format::kCSR:
      l = BuildCsr(w, rows, cols);
      break;
    case Format::kBlock1x4:
      if (cols < 4) throw std::invalid_argument("FromDense: the 1x4 block format needs at least 4 columns");
      l = BuildBlock1x4(w, rows, cols);
      break;
    case Format::kBlock4x1:
      l = BuildBlock4x1(w, rows, cols);
      break;
    case Format::kDense:
      l.val.assign(w, w + rows * cols);
      break;
    default:
      throw std::invalid_argument("FromDense: unknown format " + std::to_string(static_cast<int>(format)));
  }
  return std::make_unique<StoredMatrix>(format, rows, cols, std::move(l), nnz);
}

std::string KernelIsa() { return detail::ActiveIsa() == 1 ? "avx2+fma" : "portable"; }

}  // namespace onnxslim_sparse
