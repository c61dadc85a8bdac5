// LayerWeight (ep_weight.h): formats built from ORT's initializer in place or panel by panel.
#include "ep_weight.h"

#include <algorithm>
#include <stdexcept>

namespace onnxslim_ep {

using onnxslim_sparse::Format;
using onnxslim_sparse::FormatCounts;
using onnxslim_sparse::SparseMatrix;

int BucketOf(int64_t n) { return n <= 1 ? 0 : n <= 8 ? 1 : 2; }

namespace {

// Rows per panel of a transposed weight: a multiple of 4 (the 4x1 strips and the additive
// counts need it), at least 4, about kPanelBytes of dense floats.
int64_t PanelRows(const WeightView& w) {
  const int64_t fit = kPanelBytes / (static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(1, w.cols));
  return std::min(std::max<int64_t>(4, fit / 4 * 4), std::max<int64_t>(4, (w.rows + 3) / 4 * 4));
}

// panel[r][j] = W[row0 + r][j] for r < count, from the K x M tensor, in 32 x 32 tiles.
void TransposePanel(const WeightView& w, int64_t row0, int64_t count, float* panel) {
  constexpr int64_t kTile = 32;
  for (int64_t j0 = 0; j0 < w.cols; j0 += kTile) {
    const int64_t j1 = std::min(w.cols, j0 + kTile);
    for (int64_t r0 = 0; r0 < count; r0 += kTile) {
      const int64_t r1 = std::min(count, r0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        const float* src = w.data + j * w.rows + row0;
        for (int64_t r = r0; r < r1; ++r) panel[r * w.cols + j] = src[r];
      }
    }
  }
}

// Calls fn(row0, count, row-major panel data) over the weight: the whole weight in place when it
// is stored M x K, else panels transposed into one reused scratch buffer.
template <class Fn>
void ForEachPanel(const WeightView& w, Fn&& fn) {
  if (!w.transposed || w.rows <= 1 || w.cols <= 1) {  // a vector reads the same either way
    fn(int64_t{0}, w.rows, w.data);
    return;
  }
  const int64_t step = PanelRows(w);
  std::vector<float> scratch(static_cast<size_t>(std::min(step, w.rows) * w.cols));
  for (int64_t row0 = 0; row0 < w.rows; row0 += step) {
    const int64_t count = std::min(step, w.rows - row0);
    TransposePanel(w, row0, count, scratch.data());
    fn(row0, count, static_cast<const float*>(scratch.data()));
  }
}

}  // namespace

FormatCounts CountWeight(const WeightView& w) {
  FormatCounts total;
  total.cols = w.cols;
  ForEachPanel(w, [&](int64_t, int64_t count, const float* data) {
    total += onnxslim_sparse::CountFormatEntries(data, count, w.cols);
  });
  return total;
}

LayerWeight::LayerWeight(const WeightView& w, const std::array<Format, kBuckets>& formats, int first_bucket,
                         int max_formats)
    : rows_(w.rows), cols_(w.cols) {
  if (first_bucket < 0 || first_bucket >= kBuckets) throw std::invalid_argument("LayerWeight: bad bucket");
  std::vector<Format> built;  // distinct formats in build order
  auto slot_of = [&](Format f) -> int {
    auto it = std::find(built.begin(), built.end(), f);
    if (it != built.end()) return static_cast<int>(it - built.begin());
    if (static_cast<int>(built.size()) >= std::max(1, max_formats)) return -1;
    built.push_back(f);
    return static_cast<int>(built.size()) - 1;
  };
  primary_ = slot_of(formats[first_bucket]);
  for (int b = 0; b < kBuckets; ++b) {
    const int s = b == first_bucket ? primary_ : slot_of(formats[b]);
    slot_[b] = s < 0 ? primary_ : s;
  }
  formats_.resize(built.size());
  ForEachPanel(w, [&](int64_t row0, int64_t count, const float* data) {
    for (size_t s = 0; s < built.size(); ++s)
      formats_[s].push_back(Panel{built[s], row0, SparseMatrix::FromDense(data, count, w.cols, built[s])});
  });
  for (const Panel& p : formats_[primary_]) nonzeros_ += p.m->nonzeros();
}

size_t LayerWeight::bytes() const {
  size_t total = 0;
  for (const auto& panels : formats_)
    for (const Panel& p : panels) total += p.m->bytes();
  return total;
}

void LayerWeight::Multiply(const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, float alpha,
                           const float* bias, onnxslim_sparse::Activation act,
                           const onnxslim_sparse::ParallelFor& parallel) const {
  for (const Panel& p : formats_[slot_[BucketOf(n)]])
    p.m->Multiply(x, n, ldx, y + p.row0 * ldy, ldy, alpha, bias ? bias + p.row0 : nullptr, act, parallel);
}

}  // namespace onnxslim_ep
