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

// Direct sparse convolution (SparseConv, kernels_conv.cc): one image, already copied into the
// zero-padded buffer `in` ([C][Hp][Wp] plus kConvTail zero floats, so that a full tile read past
// the last position stays inside). Position i = oy*Wp + ox of the "padded-width" output;
// out[o][i] = sum_j val[j] * in[i + off[j]] over the nonzeros j in [ptr[o], ptr[o+1]).
constexpr int64_t kConvTile = 64;  // positions per register tile (8 ymm accumulators)
constexpr int64_t kConvTail = kConvTile;

// The nonzeros of output channel o are ordered by input channel and split into `blocks` runs,
// one per block of input channels: run b is [ptr[o*(blocks+1) + b], ptr[o*(blocks+1) + b + 1]).
// The kernel runs input-channel block by block over all its output channels, so one block's
// input slice (its channels x kh rows of ~64 floats) stays in L1 while every filter uses it;
// partial sums wait in `acc` (o1 - o0 rows of kConvTile floats) between blocks.
struct DirectConvArgs {
  const float* in;
  const int64_t* ptr;  // out_channels * (blocks + 1)
  int64_t blocks;
  const int32_t* off;  // per nonzero: its shift into `in`
  const float* val;
  float* y;            // [out_channels][out_h][out_w] of this image
  int64_t out_h, out_w, wp;
  int64_t positions;   // (out_h - 1) * wp + out_w: the last valid position + 1
  const float* bias;   // per output channel, or nullptr
  bool relu;
};

// Writes the tile's kConvTile results buf (positions [p0, p0 + kConvTile)) of output channel o
// to y, dropping the Wp - out_w padding columns (kernels_conv.cc; plain code, no AVX).
void StoreConvTile(const DirectConvArgs& a, int64_t o, int64_t p0, const float* buf);

// Output channels [o0, o1) of the tile starting at position p0 (a multiple of kConvTile); acc:
// scratch of (o1 - o0) * kConvTile floats, 32-byte aligned (used only when blocks > 1).
using DirectConvKernel = void (*)(const DirectConvArgs& a, int64_t p0, int64_t o0, int64_t o1, float* acc);

struct KernelSet {
  TileKernel csr, block1x4, block4x1, dense;
  DirectConvKernel direct_conv;
};

const KernelSet& ActiveKernels();  // the set ActiveIsa picked (kernels_matrix.cc)

const KernelSet& PortableKernels();
const KernelSet& Avx2Kernels();  // only call when the CPU supports avx2 and fma

}  // namespace detail
}  // namespace onnxslim_sparse
