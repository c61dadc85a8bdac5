// Claim rules. A node is taken only when its weight is a float32 constant initializer with at
// least `min_sparsity` exact zeros and every attribute is one the compiled op reproduces exactly;
// anything else stays with the next EP (the CPU EP). A following Relu (and for MatMul a bias
// Add) joins the group only when the op's output feeds nothing else.
#include "ep_graph.h"

#include <algorithm>
#include <optional>
#include <set>

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

// The weight of a claimable op (already checked for sparsity), or nullopt with the node left alone.
std::optional<Tensor> ClaimableWeight(const Ort::ConstNode& node, const std::string& op, const EpConfig& config) {
  auto inputs = Inputs(node);
  auto outputs = node.GetOutputs();
  if (inputs.size() < 2 || outputs.size() != 1 || inputs[0] == nullptr || inputs[1] == nullptr) return std::nullopt;
  if (!IsFloat(inputs[0]) || !IsFloat(outputs[0]) || inputs[0].IsConstantInitializer()) return std::nullopt;
  auto w = ConstantFloat(inputs[1]);
  if (!w) return std::nullopt;
  if (op == "Gemm") {
    if (w->dims.size() != 2 || ScalarAttr<int64_t>(node, "transA", 0) < 0) return std::nullopt;
    if (inputs.size() > 2 && inputs[2] != nullptr) {
      auto c = ConstantFloat(inputs[2]);
      if (!c || !PerFeatureBias(*c, GemmOutFeatures(node, *w), 2)) return std::nullopt;
    }
  } else if (op == "MatMul") {
    if (w->dims.size() != 2) return std::nullopt;
    auto a = TensorInfo(inputs[0]);
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
    std::vector<Ort::ConstNode> group{node};
    Ort::ConstValueInfo tail = node.GetOutputs()[0];
    if (op == "MatMul") {
      auto next = OnlyConsumer(tail, in_graph);
      if (next && IsDefaultDomain(*next) && next->GetOperatorType() == "Add") {
        auto add_inputs = Inputs(*next);
        if (add_inputs.size() == 2 && add_inputs[0] != nullptr && add_inputs[1] != nullptr) {
          const size_t other = add_inputs[0].GetName() == tail.GetName() ? 1 : 0;
          auto bias = ConstantFloat(add_inputs[other]);
          auto a = TensorInfo(Inputs(node)[0]);
          if (bias && a && PerFeatureBias(*bias, w->dims[1], a->second.size()) && IsFloat(next->GetOutputs()[0])) {
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
  auto w = ConstantFloat(inputs[1]);
  if (!w) throw Ort::Exception(op->name + ": weight is not a constant float tensor", ORT_EP_FAIL);

  // The kernel's W is out_features x in_features, row-major.
  std::vector<float> dense;
  int64_t rows = 0, cols = 0, n_hint = 1;
  auto x_info = TensorInfo(inputs[0]);
  const std::vector<int64_t> x_shape = x_info ? x_info->second : std::vector<int64_t>{};
  auto transposed = [&](const Tensor& t) {  // t is K x M -> M x K
    const int64_t k = t.dims[0], m = t.dims[1];
    std::vector<float> out(static_cast<size_t>(k * m));
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < m; ++c) out[c * k + r] = t.data[r * m + c];
    return out;
  };
  if (type == "Gemm") {
    op->kind = OpKind::kGemm;
    op->alpha = ScalarAttr<float>(*main, "alpha", 1.0f);
    const float beta = ScalarAttr<float>(*main, "beta", 1.0f);
    op->trans_a = ScalarAttr<int64_t>(*main, "transA", 0) != 0;
    const bool trans_b = ScalarAttr<int64_t>(*main, "transB", 0) != 0;
    rows = trans_b ? w->dims[0] : w->dims[1];
    cols = trans_b ? w->dims[1] : w->dims[0];
    dense = trans_b ? std::vector<float>(w->data, w->data + w->size) : transposed(*w);
    if (inputs.size() > 2 && inputs[2] != nullptr) {
      auto c = ConstantFloat(inputs[2]);
      op->bias.assign(static_cast<size_t>(rows), 0.0f);
      for (int64_t i = 0; i < rows; ++i) op->bias[i] = beta * c->data[c->size == 1 ? 0 : i];
    }
    if (x_shape.size() == 2) n_hint = op->trans_a ? x_shape[1] : x_shape[0];
  } else if (type == "MatMul") {
    op->kind = OpKind::kMatMul;
    rows = w->dims[1];
    cols = w->dims[0];
    dense = transposed(*w);
    if (add) {
      auto add_inputs = Inputs(*add);
      const std::string produced = main->GetOutputs()[0].GetName();
      auto bias = ConstantFloat(add_inputs[add_inputs[0].GetName() == produced ? 1 : 0]);
      op->bias.assign(static_cast<size_t>(rows), 0.0f);
      for (int64_t i = 0; i < rows; ++i) op->bias[i] = bias->data[bias->size == 1 ? 0 : i];
    }
    n_hint = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) n_hint *= x_shape[i];
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
    rows = w->dims[0];
    cols = w->size / rows;
    dense.assign(w->data, w->data + w->size);
    if (inputs.size() > 2 && inputs[2] != nullptr) {
      auto b = ConstantFloat(inputs[2]);
      op->bias.assign(b->data, b->data + b->size);
    }
    auto y_info = TensorInfo(main->GetOutputs()[0]);
    n_hint = 1;
    if (y_info && y_info->second.size() == rank + 2)
      for (size_t i = 2; i < y_info->second.size(); ++i) n_hint *= std::max<int64_t>(1, y_info->second[i]);
    else
      n_hint = 256;
  }
  n_hint = std::max<int64_t>(1, n_hint);
  const Format format = config.format >= 0 ? static_cast<Format>(config.format)
                                           : SparseMatrix::ChooseFormat(dense.data(), rows, cols, n_hint);
  op->w = SparseMatrix::FromDense(dense.data(), rows, cols, format);

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

}  // namespace onnxslim_ep
