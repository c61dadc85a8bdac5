// SparseConv (sparse_kernels.h): the direct sparse convolution for stride-1 convs. Builds the
// per-output-channel nonzero lists, copies each image into a zero-padded buffer, turns every
// nonzero (c, ky, kx) into one shift into that buffer for the geometry of the call, and splits
// the output into (tile of kConvTile positions) x (block of output channels) units for
// ParallelFor. The inner loops are kernels_avx2.cc / kernels_portable.cc's DirectConv.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels_internal.h"
#include "sparse_kernels.h"

namespace onnxslim_sparse {
namespace detail {

void StoreConvTile(const DirectConvArgs& a, int64_t o, int64_t p0, const float* buf) {
  float* plane = a.y + o * a.out_h * a.out_w;
  const int64_t end = std::min(p0 + kConvTile, a.positions);
  int64_t oy = p0 / a.wp, ox = p0 - oy * a.wp;
  for (int64_t p = p0; p < end;) {
    if (ox >= a.out_w) {  // a padding column: skip to the next output row
      p += a.wp - ox;
      ++oy;
      ox = 0;
      continue;
    }
    const int64_t n = std::min(a.out_w - ox, end - p);
    std::memcpy(plane + oy * a.out_w + ox, buf + (p - p0), sizeof(float) * n);
    p += n;
    ox += n;
  }
}

namespace {

std::atomic<int64_t> g_conv_path_runs[3];
constexpr int64_t kL1Budget = 26 * 1024;

class DirectSparseConv final : public SparseConv {
 public:
  DirectSparseConv(const float* w, int64_t oc, int64_t ic, int64_t kh, int64_t kw)
      : oc_(oc), ic_(ic), kh_(kh), kw_(kw) {
    // Input channels per block: their slices (kh rows of a tile plus the kernel's reach, ~0.8 KB
    // per channel for 3x3) fill about 26 KB of a 32 KB L1: blocks of 32 channels for 3x3, the best
    // of 8/16/32/64/all measured on the VGG-16 shapes (1 thread, 90 %).
    const int64_t per_channel = kh * (kConvTile + kw - 1) * static_cast<int64_t>(sizeof(float));
    int64_t block = std::max<int64_t>(1, kL1Budget / per_channel);
    blocks_ = std::max<int64_t>(1, (ic + block - 1) / block);
    block = (ic + blocks_ - 1) / blocks_;  // even blocks
    const int64_t taps = kh * kw, k = ic * taps;
    ptr_.reserve(oc * (blocks_ + 1));
    for (int64_t o = 0; o < oc; ++o) {
      for (int64_t b = 0; b < blocks_; ++b) {
        ptr_.push_back(static_cast<int64_t>(val_.size()));
        for (int64_t j = b * block * taps, end = std::min(k, (b + 1) * block * taps); j < end; ++j) {
          const float v = w[o * k + j];
          if (v == 0.0f) continue;
          val_.push_back(v);
          chan_.push_back(static_cast<int32_t>(j / taps));
          tap_.push_back(static_cast<int32_t>(j % taps));
        }
      }
      ptr_.push_back(static_cast<int64_t>(val_.size()));
    }
  }

  int64_t out_channels() const override { return oc_; }
  int64_t in_channels() const override { return ic_; }
  int64_t nonzeros() const override { return static_cast<int64_t>(val_.size()); }
  size_t bytes() const override {
    return ptr_.size() * sizeof(int64_t) + (chan_.size() + tap_.size()) * sizeof(int32_t) +
           val_.size() * sizeof(float);
  }

  void Run(const float* x, int64_t batch, const ConvGeometry& g, float* y, const float* bias, Activation act,
           const ParallelFor& parallel) const override;

 private:
  int64_t oc_, ic_, kh_, kw_, blocks_ = 1;
  std::vector<int64_t> ptr_;  // out_channels x (blocks_ + 1), see DirectConvArgs
  std::vector<int32_t> chan_;  // input channel c of each nonzero
  std::vector<int32_t> tap_;   // ky*kw + kx of each nonzero
  std::vector<float> val_;
};

void DirectSparseConv::Run(const float* x, int64_t batch, const ConvGeometry& g, float* y, const float* bias,
                           Activation act, const ParallelFor& parallel) const {
  if (batch < 0 || g.out_h < 1 || g.out_w < 1 || g.in_h < 1 || g.in_w < 1 || g.dil_h < 1 || g.dil_w < 1 ||
      g.pad_top < 0 || g.pad_left < 0)
    throw std::invalid_argument("SparseConv::Run: need batch >= 0, positive sizes and dilations, pads >= 0");
  if (batch == 0 || oc_ == 0) return;
  // Stride 1: the padded image is exactly what the output needs (trailing pads follow from it).
  const int64_t hp = g.out_h + (kh_ - 1) * g.dil_h, wp = g.out_w + (kw_ - 1) * g.dil_w;
  const int64_t plane = hp * wp, padded = ic_ * plane + kConvTail;
  if (padded > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("SparseConv::Run: padded image over 2^31 floats");
  const int64_t out_plane = g.out_h * g.out_w;

  // Shift of every nonzero for this geometry: a multiply-add per nonzero (no divisions: on a
  // 7x7 map, where the products are short, dividing here cost as much as the convolution), and
  // the object stays independent of the input size.
  std::vector<int32_t> tap_shift(static_cast<size_t>(kh_ * kw_));
  for (int64_t ky = 0; ky < kh_; ++ky)
    for (int64_t kx = 0; kx < kw_; ++kx) tap_shift[ky * kw_ + kx] = static_cast<int32_t>(ky * g.dil_h * wp + kx * g.dil_w);
  std::vector<int32_t> off(tap_.size());
  const int32_t plane32 = static_cast<int32_t>(plane);
  for (size_t j = 0; j < tap_.size(); ++j) off[j] = chan_[j] * plane32 + tap_shift[tap_[j]];
  std::unique_ptr<float[]> in(new float[padded]);
  std::fill(in.get() + ic_ * plane, in.get() + padded, 0.0f);

  DirectConvArgs a{in.get(), ptr_.data(), blocks_, off.data(), val_.data(), nullptr, g.out_h, g.out_w, wp,
                   (g.out_h - 1) * wp + g.out_w, bias, act == Activation::kRelu};
  const DirectConvKernel kernel = ActiveKernels().direct_conv;
  const int64_t tiles = (a.positions + kConvTile - 1) / kConvTile;
  // At least ~32 units so a pool of any size balances; channel blocks only when the map is small.
  const int64_t channel_blocks = std::min<int64_t>(oc_, std::max<int64_t>(1, (32 + tiles - 1) / tiles));
  const int64_t channel_block = (oc_ + channel_blocks - 1) / channel_blocks;
  const int64_t units = tiles * channel_blocks;
  // Pads larger than the padded image (possible only with odd explicit pads) are clipped.
  const int64_t top = std::min(g.pad_top, hp), left = std::min(g.pad_left, wp);
  const int64_t rows_in = std::max<int64_t>(0, std::min(g.in_h, hp - top));
  const int64_t cols_in = std::max<int64_t>(0, std::min(g.in_w, wp - left));

  for (int64_t n = 0; n < batch; ++n) {
    const float* image = x + n * ic_ * g.in_h * g.in_w;
    auto pad_copy = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* dst = in.get() + c * plane;
        const float* src = image + c * g.in_h * g.in_w;
        std::fill(dst, dst + top * wp, 0.0f);
        for (int64_t r = 0; r < rows_in; ++r) {
          float* row = dst + (top + r) * wp;
          std::fill(row, row + left, 0.0f);
          std::memcpy(row + left, src + r * g.in_w, sizeof(float) * cols_in);
          std::fill(row + left + cols_in, row + wp, 0.0f);
        }
        std::fill(dst + (top + rows_in) * wp, dst + plane, 0.0f);
      }
    };
    if (parallel && ic_ * plane >= (1 << 16)) parallel(ic_, pad_copy); else pad_copy(0, ic_);
    a.y = y + n * oc_ * out_plane;
    auto work = [&](int64_t u0, int64_t u1) {
      // Partial sums of one unit between input-channel blocks (32-byte aligned for the AVX2 loads).
      std::unique_ptr<float[]> scratch(new float[channel_block * kConvTile + 8]);
      float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.get()) + 31) & ~uintptr_t{31});
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t tile = u / channel_blocks, cb = u % channel_blocks;
        const int64_t o0 = cb * channel_block, o1 = std::min(oc_, o0 + channel_block);
        if (o0 < o1) kernel(a, tile * kConvTile, o0, o1, acc);
      }
    };
    if (parallel) parallel(units, work); else work(0, units);
  }
  CountConvPathRun(0, batch);
}

}  // namespace
}  // namespace detail

std::unique_ptr<SparseConv> SparseConv::FromDense(const float* w, int64_t out_channels, int64_t in_channels,
                                                  int64_t kh, int64_t kw) {
  if (out_channels < 0 || in_channels < 1 || kh < 1 || kw < 1 || (out_channels > 0 && w == nullptr))
    throw std::invalid_argument("SparseConv::FromDense: need out_channels >= 0, positive in_channels/kernel, weights");
  if (in_channels * kh * kw > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("SparseConv::FromDense: more than 2^31 taps per filter");
  return std::make_unique<detail::DirectSparseConv>(w, out_channels, in_channels, kh, kw);
}

int64_t ConvPathRuns(int which) {
  return which >= 0 && which < 3 ? detail::g_conv_path_runs[which].load(std::memory_order_relaxed) : -1;
}

void CountConvPathRun(int which, int64_t images) {
  if (which >= 0 && which < 3) detail::g_conv_path_runs[which].fetch_add(images, std::memory_order_relaxed);
}

}  // namespace onnxslim_sparse
