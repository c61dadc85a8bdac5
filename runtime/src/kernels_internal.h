// Private to the kernels_*.cc files: plain views of the stored formats and the inner loops.
//
// The inner loops exist twice, portable (kernels_portable.cc, baseline x86-64 / any CPU) and
// AVX2+FMA (kernels_avx2.cc, compiled with a target pragma so the library builds with plain
// `g++ -O3` and still loads on a CPU without AVX2). Only plain C types cross this header so
// that no inline or template code is shared between the two translation units (a COMDAT copy
// compiled for AVX2 could otherwise be picked by the linker for the portable path).
#pragma once

#include <cstdint>

namespace onnxslim_sparse {
namespace detail {

// Blocked formats: BLOCK_R x BLOCK_C blocks, values row-major inside a block. For 1x4, `ptr`
// indexes rows and a block starts at column col[b] (col[b] + 4 <= cols, see kernels_matrix.cc);
// for 4x1, `ptr` indexes strips of 4 rows (the last strip may be partial; its padding is zero).
// CSR is the 1x1 case. Dense uses `val` only (rows x cols, row-major).
struct SparseView {
  const int64_t* ptr;  // rows + 1 (CSR, 1x4) or strips + 1 (4x1) offsets, in blocks
  const int32_t* col;  // first column of each block
  const uint16_t* col16;  // CSR only: the same columns as 16-bit indices when cols <= 65536
                          // (then col is nullptr): 6 instead of 8 bytes per nonzero to stream
  const float* val;    // block values, zero-padded
  int64_t rows;
  int64_t cols;
};

struct Epilogue {
  float alpha;
  const float* bias;  // per output row, or nullptr
  bool relu;
};

// One unit of work: output rows [row0, row1) x output columns [col0, col1). For 4x1, row0 is a
// multiple of 4. Every output element is computed by exactly one call, in an order that does
// not depend on how the units were split, so results are identical for any thread count.
struct Tile {
  int64_t row0, row1, col0, col1;
};

struct Operands {
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
};

using TileKernel = void (*)(const SparseView& w, const Operands& io, const Epilogue& ep, const Tile& t);

struct KernelSet {
  TileKernel csr, block1x4, block4x1, dense;
};

const KernelSet& PortableKernels();
const KernelSet& Avx2Kernels();  // only call when the CPU supports avx2 and fma

}  // namespace detail
}  // namespace onnxslim_sparse
