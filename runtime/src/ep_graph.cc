// Claim rules. A node is taken only when its weight is a float32 constant initializer with at
// least `min_sparsity` exact zeros and every attribute is one the compiled op reproduces exactly;
// anything else stays with the next EP (the CPU EP). A following Relu (and for MatMul a bias
// Add) joins the group only when the op's output feeds nothing else.
#include "ep_graph.h"

#include <algorithm>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "ep_fallback.h"
#include "ep_weight.h"

namespace onnxslim_ep {

namespace {

using onnxslim_sparse::Activation;
using onnxslim_sparse::Format;
using onnxslim_sparse::SparseMatrix;

struct Tensor {
  std::vector<int64_t> dims;
  const float* data = nullptr;
  int64_t size = 0;
};

bool IsDefaultDomain(const Ort::ConstNode& node) {
  const std::string d = node.GetDomain();
  return d.empty() || d == "ai.onnx";
}

// Shape and element type of a value; nullopt when it is not a tensor.
std::optional<std::pair<ONNXTensorElementDataType, std::vector<int64_t>>> TensorInfo(const Ort::ConstValueInfo& v) {
  auto type = v.TypeInfo();
  if (type.GetONNXType() != ONNX_TYPE_TENSOR) return std::nullopt;
  auto info = type.GetTensorTypeAndShapeInfo();
  return std::make_pair(info.GetElementType(), info.GetShape());
}

bool IsFloat(const Ort::ConstValueInfo& v) {
  auto info = TensorInfo(v);
  return info && info->first == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

std::optional<Tensor> ConstantFloat(const Ort::ConstValueInfo& v) {
  if (v == nullptr || !v.IsConstantInitializer()) return std::nullopt;
  Ort::ConstValue value{nullptr};
  if (!v.GetInitializer(value).IsOK() || value == nullptr) return std::nullopt;
  auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return std::nullopt;
  Tensor t;
  t.dims = info.GetShape();
  t.size = static_cast<int64_t>(info.GetElementCount());
  t.data = value.GetTensorData<float>();
  return t;
}

double ZeroShare(const Tensor& t) {
  if (t.size == 0) return 0.0;
  const int64_t zeros = std::count(t.data, t.data + t.size, 0.0f);  // -0.0f == 0.0f too
  return static_cast<double>(zeros) / static_cast<double>(t.size);
}

template <typename T>
T ScalarAttr(const Ort::ConstNode& node, const char* name, T fallback) {
  Ort::ConstOpAttr attr{nullptr};
  if (!node.GetAttributeByName(name, attr).IsOK() || attr == nullptr) return fallback;
  T value{};
  if (!attr.GetValue(value).IsOK()) return fallback;
  return value;
}

std::string StringAttr(const Ort::ConstNode& node, const char* name, const std::string& fallback) {
  Ort::ConstOpAttr attr{nullptr};
  if (!node.GetAttributeByName(name, attr).IsOK() || attr == nullptr) return fallback;
  std::string value;
  if (!attr.GetValue(value).IsOK()) return fallback;
  return value;
}

std::vector<int64_t> IntsAttr(const Ort::ConstNode& node, const char* name) {
  Ort::ConstOpAttr attr{nullptr};
  std::vector<int64_t> value;
  if (!node.GetAttributeByName(name, attr).IsOK() || attr == nullptr) return value;
  if (!attr.GetValueArray(value).IsOK()) value.clear();
  return value;
}

// Inputs of a node, with absent optional inputs as null value infos.
std::vector<Ort::ConstValueInfo> Inputs(const Ort::ConstNode& node) { return node.GetInputs(); }

// The single consumer of `value` inside `in_graph`, when it has exactly one and is no graph output.
std::optional<Ort::ConstNode> OnlyConsumer(const Ort::ConstValueInfo& value, const std::set<size_t>& in_graph) {
  if (value.IsGraphOutput()) return std::nullopt;
  auto consumers = value.GetConsumers();
  if (consumers.size() != 1 || consumers[0].node == nullptr) return std::nullopt;
  if (!in_graph.count(consumers[0].node.GetId())) return std::nullopt;
  return consumers[0].node;
}

// Number of output features of the op (rows of the kernel's W); 0 when it is not claimable.
int64_t GemmOutFeatures(const Ort::ConstNode& node, const Tensor& b) {
  if (b.dims.size() != 2) return 0;
  return ScalarAttr<int64_t>(node, "transB", 0) ? b.dims[0] : b.dims[1];
}

// A bias is fused only when it broadcasts along the output features alone (per-row of W).
bool PerFeatureBias(const Tensor& bias, int64_t features, size_t max_rank) {
  if (bias.dims.size() > max_rank) return false;
  if (bias.size != 1 && bias.size != features) return false;
  for (size_t i = 0; i + 1 < bias.dims.size(); ++i)
    if (bias.dims[i] != 1) return false;
  return bias.dims.empty() || bias.dims.back() == bias.size;
}

// A bias added to the output of a constant-on-the-left product W[M x K] * X[.., K x N] that is
// constant along N (per row of W): a single value, or [M, 1] with leading 1s up to out_rank
// (a 1-D X gives a 1-D output [M], where [M] itself is per row).
bool PerRowBias(const Tensor& bias, int64_t rows, size_t out_rank) {
  if (bias.dims.size() > out_rank) return false;
  if (bias.size == 1) return true;
  if (bias.size != rows) return false;
  if (out_rank == 1) return bias.dims.size() == 1;
  const size_t r = bias.dims.size();
  if (r < 2 || bias.dims[r - 1] != 1 || bias.dims[r - 2] != rows) return false;
  for (size_t i = 0; i + 2 < r; ++i)
    if (bias.dims[i] != 1) return false;
  return true;
}

// Which input of a Gemm/MatMul is the constant weight: 1 (the usual x * W), 0 (W * x, the
// kernels' own orientation) or -1 when neither or both are constant initializers.
int WeightInput(const std::vector<Ort::ConstValueInfo>& inputs) {
  const bool a_const = inputs[0].IsConstantInitializer(), b_const = inputs[1].IsConstantInitializer();
  if (a_const == b_const) return -1;
  return b_const ? 1 : 0;
}

// The weight of a claimable op (already checked for sparsity), or nullopt with the node left alone.
std::optional<Tensor> ClaimableWeight(const Ort::ConstNode& node, const std::string& op, const EpConfig& config) {
  auto inputs = Inputs(node);
  auto outputs = node.GetOutputs();
  if (inputs.size() < 2 || outputs.size() != 1 || inputs[0] == nullptr || inputs[1] == nullptr) return std::nullopt;
  const int wi = op == "Conv" ? (inputs[0].IsConstantInitializer() ? -1 : 1) : WeightInput(inputs);
  if (wi < 0 || !IsFloat(inputs[1 - wi]) || !IsFloat(outputs[0])) return std::nullopt;
  auto w = ConstantFloat(inputs[wi]);
  if (!w || w->size == 0) return std::nullopt;  // no elements (e.g. 0 output channels): nothing to run sparse
  if (op == "Gemm") {
    if (w->dims.size() != 2) return std::nullopt;
    if (inputs.size() > 2 && inputs[2] != nullptr) {
      auto c = ConstantFloat(inputs[2]);
      if (!c) return std::nullopt;
      if (wi == 1 && !PerFeatureBias(*c, GemmOutFeatures(node, *w), 2)) return std::nullopt;
      // Constant A: Y is M x N with M = A's rows (after transA); C must be constant per row.
      const int64_t m = ScalarAttr<int64_t>(node, "transA", 0) ? w->dims[1] : w->dims[0];
      if (wi == 0 && !PerRowBias(*c, m, 2)) return std::nullopt;
    }
  } else if (op == "MatMul") {
    if (w->dims.size() != 2) return std::nullopt;
    auto a = TensorInfo(inputs[1 - wi]);
    if (!a || a->second.empty()) return std::nullopt;  // rank must be known
  } else {  // Conv
    if (w->dims.size() != 3 && w->dims.size() != 4) return std::nullopt;
    if (ScalarAttr<int64_t>(node, "group", 1) != 1) return std::nullopt;
    if (inputs.size() > 2 && inputs[2] != nullptr) {
      auto b = ConstantFloat(inputs[2]);
      if (!b || b->size != w->dims[0]) return std::nullopt;
    }
    const std::string auto_pad = StringAttr(node, "auto_pad", "NOTSET");
    if (auto_pad != "NOTSET" && auto_pad != "SAME_UPPER" && auto_pad != "SAME_LOWER" && auto_pad != "VALID")
      return std::nullopt;
    const size_t rank = w->dims.size() - 2;
    auto kernel = IntsAttr(node, "kernel_shape");
    if (!kernel.empty() && (kernel.size() != rank || !std::equal(kernel.begin(), kernel.end(), w->dims.begin() + 2)))
      return std::nullopt;
    auto strides = IntsAttr(node, "strides"), dilations = IntsAttr(node, "dilations"), pads = IntsAttr(node, "pads");
    if ((!strides.empty() && strides.size() != rank) || (!dilations.empty() && dilations.size() != rank) ||
        (!pads.empty() && pads.size() != 2 * rank))
      return std::nullopt;
  }
  if (ZeroShare(*w) < config.min_sparsity) return std::nullopt;
  return w;
}


// Product of the known (positive) dims; unknown ones count as 1.
int64_t KnownProduct(const std::vector<int64_t>& dims, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end && i < dims.size(); ++i) n *= std::max<int64_t>(1, dims[i]);
  return n;
}

// The weight as the kernels see it (out_features x in_features), read in place from ORT's
// initializer (ep_weight.h), and the number of columns the products will have: the batch rows
// of Gemm/MatMul (1 when dynamic), X's last axis for a constant left operand, the output
// pixels of a Conv.
struct KernelWeight {
  WeightView view;
  int64_t n_hint = 1;
};

KernelWeight KernelWeightOf(const Ort::ConstNode& node, const Tensor& t) {
  KernelWeight k;
  const std::string op = node.GetOperatorType();
  auto inputs = Inputs(node);
  const bool left = op != "Conv" && WeightInput(inputs) == 0;
  auto x_info = TensorInfo(inputs[left ? 1 : 0]);
  const std::vector<int64_t> x_shape = x_info ? x_info->second : std::vector<int64_t>{};
  k.view.data = t.data;
  if (op == "Conv") {
    k.view.rows = t.dims[0];
    k.view.cols = t.size / k.view.rows;
    auto y_info = TensorInfo(node.GetOutputs()[0]);
    k.n_hint = y_info && y_info->second.size() == t.dims.size() ? KnownProduct(y_info->second, 2, t.dims.size()) : 256;
    return k;
  }
  if (left) {  // W = A (transA: A is K x M) times X = B / B^T / x[b]
    const bool trans_a = op == "Gemm" && ScalarAttr<int64_t>(node, "transA", 0) != 0;
    k.view = WeightView{t.data, trans_a ? t.dims[1] : t.dims[0], trans_a ? t.dims[0] : t.dims[1], trans_a};
    int64_t n = 1;
    if (op == "Gemm" && x_shape.size() == 2) n = ScalarAttr<int64_t>(node, "transB", 0) ? x_shape[0] : x_shape[1];
    if (op == "MatMul" && x_shape.size() >= 2) n = x_shape.back();
    k.n_hint = std::max<int64_t>(1, n);
    return k;
  }
  const bool trans_b = op == "Gemm" && ScalarAttr<int64_t>(node, "transB", 0) != 0;
  k.view = WeightView{t.data, trans_b ? t.dims[0] : t.dims[1], trans_b ? t.dims[1] : t.dims[0], !trans_b};
  if (op == "Gemm")
    k.n_hint = x_shape.size() == 2 ? std::max<int64_t>(1, ScalarAttr<int64_t>(node, "transA", 0) ? x_shape[1] : x_shape[0]) : 1;
  else
    k.n_hint = x_shape.empty() ? 1 : KnownProduct(x_shape, 0, x_shape.size() - 1);
  return k;
}

// The cost model's format for each column regime (ep_weight.h buckets). The counts pass over the
// whole weight (transposing a panel at a time when it is stored K x M), so GetCapability's
// result is kept for Compile, keyed by initializer name and the kernels' view of it (one
// initializer can feed x * W and W^T * z: transposed counts differ) and checked against its data
// pointer.
onnxslim_sparse::FormatCounts WeightCounts(const Ort::ConstValueInfo& weight, const KernelWeight& k,
                                           const EpConfig& config) {
  onnxslim_sparse::FormatCounts counts;
  bool cached = false;
  const std::string key = weight.GetName() + '|' + std::to_string(k.view.rows) + 'x' + std::to_string(k.view.cols) +
                          (k.view.transposed ? "t" : "");
  if (config.counts) {
    std::lock_guard<std::mutex> lock(config.counts->mutex);
    auto it = config.counts->by_weight.find(key);
    if (it != config.counts->by_weight.end() && it->second.first == k.view.data) {
      counts = it->second.second;
      cached = true;
    }
  }
  if (!cached) {
    counts = CountWeight(k.view);
    if (config.counts) {
      std::lock_guard<std::mutex> lock(config.counts->mutex);
      config.counts->by_weight[key] = {k.view.data, counts};
    }
  }
  return counts;
}

std::array<Format, kBuckets> BucketFormats(const Ort::ConstValueInfo& weight, const KernelWeight& k,
                                           const EpConfig& config) {
  const onnxslim_sparse::FormatCounts counts = WeightCounts(weight, k, config);
  std::array<Format, kBuckets> formats{};
  for (int b = 0; b < kBuckets; ++b) formats[b] = onnxslim_sparse::ChooseFormatFromCounts(counts, kBucketN[b]);
  return formats;
}

// The weight's value info on a Gemm/MatMul/Conv node.
Ort::ConstValueInfo WeightValue(const Ort::ConstNode& node) {
  auto inputs = Inputs(node);
  return inputs[node.GetOperatorType() != "Conv" && WeightInput(inputs) == 0 ? 0 : 1];
}

// How a claimed Conv will run. Stride 1 -> direct sparse conv (no im2col), unless the kernel is
// 1x1 without padding (the image itself is the product's X: the SparseMatrix path, no copy) or
// a format other than CSR is forced (those formats exist only as SparseMatrix products).
struct ConvPath {
  bool direct = false;
  int64_t out_h = 16, out_w = 16, in_h = 16, in_w = 16;  // for the cost model; 16 when unknown
};

ConvPath ConvPathOf(const Ort::ConstNode& node, const Tensor& w, const EpConfig& config) {
  ConvPath p;
  const size_t rank = w.dims.size() - 2;
  auto strides = IntsAttr(node, "strides"), pads = IntsAttr(node, "pads");
  const bool stride1 = std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 1; });
  const bool kernel1 = std::all_of(w.dims.begin() + 2, w.dims.end(), [](int64_t k) { return k == 1; });
  const bool no_pads = StringAttr(node, "auto_pad", "NOTSET") != "NOTSET" ||
                       std::all_of(pads.begin(), pads.end(), [](int64_t q) { return q == 0; });
  const bool pointwise = stride1 && kernel1 && no_pads;
  p.direct = stride1 && !pointwise && (config.format < 0 || config.format == static_cast<int>(Format::kCSR));
  auto x_info = TensorInfo(Inputs(node)[0]);
  auto y_info = TensorInfo(node.GetOutputs()[0]);
  auto spatial = [&](const std::optional<std::pair<ONNXTensorElementDataType, std::vector<int64_t>>>& info,
                     int64_t& h, int64_t& wd) {
    if (!info || info->second.size() != rank + 2) return;
    const auto& d = info->second;
    const int64_t last = d[rank + 1], first = rank == 2 ? d[2] : 1;
    if (last > 0 && first > 0) {
      h = first;
      wd = last;
    }
  };
  spatial(x_info, p.in_h, p.in_w);
  p.out_h = p.in_h;  // stride-1 'same' guess when the output shape is unknown
  p.out_w = p.in_w;
  spatial(y_info, p.out_h, p.out_w);
  return p;
}

// The conv cost model of the kernels (ConvRelativeCost) says the sparse run would be slower.
bool ConvLoses(const Ort::ConstNode& node, const Tensor& w, const EpConfig& config) {
  const ConvPath p = ConvPathOf(node, w, config);
  const int64_t nnz = w.size - static_cast<int64_t>(std::count(w.data, w.data + w.size, 0.0f));
  const int64_t kh = w.dims.size() == 4 ? w.dims[2] : 1, kw = w.dims.back();
  return onnxslim_sparse::ConvRelativeCost(nnz, w.dims[0], w.dims[1], kh, kw, p.out_h, p.out_w, p.in_h, p.in_w,
                                           p.direct) >= 1.0;
}

}  // namespace

std::vector<std::vector<Ort::ConstNode>> FindClaims(const Ort::ConstGraph& graph, const EpConfig& config) {
  std::vector<std::vector<Ort::ConstNode>> claims;
  auto nodes = graph.GetNodes();
  std::set<size_t> in_graph;
  for (const auto& n : nodes) in_graph.insert(n.GetId());
  std::set<size_t> taken;
  for (const auto& node : nodes) {
    if (!IsDefaultDomain(node) || taken.count(node.GetId())) continue;
    const std::string op = node.GetOperatorType();
    if (op != "Gemm" && op != "MatMul" && op != "Conv") continue;
    auto w = ClaimableWeight(node, op, config);
    if (!w) continue;
    if (config.format < 0) {
      // When the kernels' own cost model would run this layer densely, ORT's MLAS does that
      // better: leave it to the CPU EP.
      // A Conv also has to beat ORT's dense Conv by the conv cost model (a direct conv never
      // runs a SparseMatrix, so ChooseFormat's verdict does not apply to it).
      if (op == "Conv" && ConvLoses(node, *w, config)) continue;
      if (!(op == "Conv" && ConvPathOf(node, *w, config).direct)) {
        const KernelWeight k = KernelWeightOf(node, *w);
        const int declared = BucketOf(k.n_hint);
        const Format format = BucketFormats(WeightValue(node), k, config)[declared];
        if (format == Format::kDense) continue;
        // Same for a Gemm/MatMul that ORT's MLAS is expected to run faster at its declared width
        // (the dense_fallback rule): claiming it would only route it back to MLAS.
        if (op != "Conv" && config.dense_fallback == 1 &&
            MlasWins(WeightCounts(WeightValue(node), k, config), format, declared))
          continue;
      }
    }
    std::vector<Ort::ConstNode> group{node};
    Ort::ConstValueInfo tail = node.GetOutputs()[0];
    if (op == "MatMul") {
      auto next = OnlyConsumer(tail, in_graph);
      if (next && IsDefaultDomain(*next) && next->GetOperatorType() == "Add") {
        auto add_inputs = Inputs(*next);
        if (add_inputs.size() == 2 && add_inputs[0] != nullptr && add_inputs[1] != nullptr) {
          const size_t other = add_inputs[0].GetName() == tail.GetName() ? 1 : 0;
          auto bias = ConstantFloat(add_inputs[other]);
          const bool left = WeightInput(Inputs(node)) == 0;
          auto a = TensorInfo(Inputs(node)[left ? 1 : 0]);
          const bool per_output = bias && a &&
                                  (left ? PerRowBias(*bias, w->dims[0], a->second.size())
                                        : PerFeatureBias(*bias, w->dims[1], a->second.size()));
          if (per_output && IsFloat(next->GetOutputs()[0])) {
            group.push_back(*next);
            tail = next->GetOutputs()[0];
          }
        }
      }
    }
    auto next = OnlyConsumer(tail, in_graph);
    if (next && IsDefaultDomain(*next) && next->GetOperatorType() == "Relu" && !taken.count(next->GetId()))
      group.push_back(*next);
    for (const auto& g : group) taken.insert(g.GetId());
    claims.push_back(std::move(group));
  }
  return claims;
}

namespace {
std::unique_ptr<SparseOp> FinishOp(std::unique_ptr<SparseOp> op, const std::vector<Ort::ConstValueInfo>& inputs,
                                   const Ort::ConstNode& fused_node);
}  // namespace

std::unique_ptr<SparseOp> BuildSparseOp(const Ort::ConstGraph& group, const Ort::ConstNode& fused_node,
                                        const EpConfig& config) {
  auto op = std::make_unique<SparseOp>();
  std::optional<Ort::ConstNode> main, add;
  for (const auto& n : group.GetNodes()) {
    const std::string t = n.GetOperatorType();
    if (t == "Gemm" || t == "MatMul" || t == "Conv") main = n;
    else if (t == "Add") add = n;
    else if (t == "Relu") op->act = Activation::kRelu;
    else throw Ort::Exception("unexpected node " + t + " in a sparse group", ORT_EP_FAIL);
  }
  if (!main) throw Ort::Exception("sparse group without Gemm/MatMul/Conv", ORT_EP_FAIL);
  const std::string type = main->GetOperatorType();
  op->name = main->GetName();
  auto inputs = Inputs(*main);
  const int wi = type == "Conv" ? 1 : WeightInput(inputs);
  auto w = wi < 0 ? std::nullopt : ConstantFloat(inputs[wi]);
  if (!w) throw Ort::Exception(op->name + ": weight is not a constant float tensor", ORT_EP_FAIL);
  op->weight_left = wi == 0;
  if (op->weight_left) std::swap(inputs[0], inputs[1]);  // inputs[0]: the activation from here on

  KernelWeight k = KernelWeightOf(*main, *w);
  const int64_t rows = k.view.rows, cols = k.view.cols;
  if (type == "Gemm") {
    op->kind = OpKind::kGemm;
    op->alpha = ScalarAttr<float>(*main, "alpha", 1.0f);
    const float beta = ScalarAttr<float>(*main, "beta", 1.0f);
    op->trans_a = ScalarAttr<int64_t>(*main, "transA", 0) != 0;
    op->trans_b = ScalarAttr<int64_t>(*main, "transB", 0) != 0;
    if (inputs.size() > 2 && inputs[2] != nullptr && beta != 0.0f) {  // ORT skips C when beta == 0
      auto c = ConstantFloat(inputs[2]);
      op->bias.assign(static_cast<size_t>(rows), 0.0f);
      for (int64_t i = 0; i < rows; ++i) op->bias[i] = beta * c->data[c->size == 1 ? 0 : i];
    }
  } else if (type == "MatMul") {
    op->kind = OpKind::kMatMul;
    if (add) {
      auto add_inputs = Inputs(*add);
      const std::string produced = main->GetOutputs()[0].GetName();
      auto bias = ConstantFloat(add_inputs[add_inputs[0].GetName() == produced ? 1 : 0]);
      op->bias.assign(static_cast<size_t>(rows), 0.0f);
      for (int64_t i = 0; i < rows; ++i) op->bias[i] = bias->data[bias->size == 1 ? 0 : i];
    }
  } else {
    op->kind = OpKind::kConv;
    const size_t rank = w->dims.size() - 2;
    ConvAttrs& c = op->conv;
    c.spatial_rank = static_cast<int>(rank);
    c.auto_pad = StringAttr(*main, "auto_pad", "NOTSET");
    auto strides = IntsAttr(*main, "strides"), dilations = IntsAttr(*main, "dilations"), pads = IntsAttr(*main, "pads");
    const size_t off = rank == 1 ? 1 : 0;  // 1-D convs use the width axis
    for (size_t i = 0; i < rank; ++i) {
      c.kernel[off + i] = w->dims[2 + i];
      if (!strides.empty()) c.stride[off + i] = strides[i];
      if (!dilations.empty()) c.dilation[off + i] = dilations[i];
      if (!pads.empty()) {
        c.pad_begin[off + i] = pads[i];
        c.pad_end[off + i] = pads[rank + i];
      }
    }
    if (inputs.size() > 2 && inputs[2] != nullptr) {
      auto b = ConstantFloat(inputs[2]);
      op->bias.assign(b->data, b->data + b->size);
    }
    if (ConvPathOf(*main, *w, config).direct) {
      op->direct = onnxslim_sparse::SparseConv::FromDense(w->data, w->dims[0], w->dims[1], c.kernel[0], c.kernel[1]);
      return FinishOp(std::move(op), inputs, fused_node);
    }
  }
  std::array<Format, kBuckets> formats{};
  if (config.format >= 0) formats.fill(static_cast<Format>(config.format));
  else formats = BucketFormats(WeightValue(*main), k, config);
  // A forced 1x4 format cannot hold fewer than 4 input features: such a layer runs as CSR
  // rather than failing the whole session.
  for (Format& f : formats)
    if (f == Format::kBlock1x4 && cols < 4) f = Format::kCSR;
  const int declared = BucketOf(k.n_hint);
  if (type == "Conv")  // stored OC x C*kh*kw already: built in place, one format (its N is fixed)
    op->w = SparseMatrix::FromDense(k.view.data, rows, cols, formats[declared]);
  else
    op->w = std::make_unique<LayerWeight>(k.view, formats, declared, config.max_formats);
  // x * W (not W * x, not Gemm's transA): regimes where ORT's MLAS is expected to win run there.
  if (type != "Conv" && !op->weight_left && !op->trans_a && config.dense_fallback > 0) {
    const auto* layer = static_cast<const LayerWeight*>(op->w.get());
    for (int b = 0; b < kBuckets; ++b)
      op->fallback_for[b] = config.dense_fallback == 2 ||
                            (config.format < 0 && MlasWins(WeightCounts(WeightValue(*main), k, config),
                                                           layer->FormatFor(kBucketN[b]), b));
    if (op->fallback_for[0] || op->fallback_for[1] || op->fallback_for[2])
      op->fallback = std::make_shared<DenseFallback>(w->data, w->dims[0], w->dims[1], op->trans_b, op->bias,
                                                     op->alpha, op->act == Activation::kRelu, config.threads);
  }
  return FinishOp(std::move(op), inputs, fused_node);
}

namespace {

std::unique_ptr<SparseOp> FinishOp(std::unique_ptr<SparseOp> op, const std::vector<Ort::ConstValueInfo>& inputs,
                                   const Ort::ConstNode& fused_node) {
  // Where the activation sits among the fused node's runtime inputs (constants are dropped).
  const std::string x_name = inputs[0].GetName();
  auto fused_inputs = fused_node.GetInputs();
  bool found = false;
  for (size_t i = 0; i < fused_inputs.size(); ++i) {
    if (fused_inputs[i] != nullptr && fused_inputs[i].GetName() == x_name) {
      op->x_input = i;
      found = true;
      break;
    }
  }
  if (!found) throw Ort::Exception(op->name + ": activation input not found on the fused node", ORT_EP_FAIL);
  return op;
}

}  // namespace

}  // namespace onnxslim_ep
