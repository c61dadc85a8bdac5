// DenseFallback (ep_fallback.h): a private ORT session running Gemm [+ Relu] with MLAS.
#include "ep_fallback.h"

#include <cstring>
#include <string>

namespace onnxslim_ep {

using onnxslim_sparse::Format;
using onnxslim_sparse::FormatCounts;

bool MlasWins(const FormatCounts& c, Format format, int bucket) {
  const double weights = static_cast<double>(c.rows) * static_cast<double>(c.cols);
  const double vectors = bucket == 0 ? 1.0 : static_cast<double>((kBucketN[bucket] + 7) / 8);  // as the format costs
  return onnxslim_sparse::FormatCost(c, format, kBucketN[bucket]) > kMlasCostPerWeight[bucket] * weights * vectors;
}

DenseFallback::DenseFallback(const float* weight, int64_t dim0, int64_t dim1, bool trans_b,
                             const std::vector<float>& bias, float alpha, bool relu, int threads) {
  const int64_t k = trans_b ? dim1 : dim0, m = trans_b ? dim0 : dim1;
  env_ = Ort::Env();  // ORT keeps one environment per process: this is the running one
  Ort::Graph graph;
  const std::vector<std::string> rows_name{"rows", ""};
  auto tensor_info = [](const std::vector<int64_t>& dims, const std::vector<std::string>* symbolic) {
    Ort::TensorTypeAndShapeInfo info(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, dims, symbolic);
    return Ort::TypeInfo::CreateTensorInfo(info.GetConst());
  };
  std::vector<Ort::ValueInfo> inputs, outputs;
  const std::vector<std::string> sym_x{"rows", ""}, sym_y{"rows", ""};
  auto x_type = tensor_info({-1, k}, &sym_x);
  auto y_type = tensor_info({-1, m}, &sym_y);
  inputs.emplace_back("x", x_type.GetConst());
  outputs.emplace_back("y", y_type.GetConst());
  graph.SetInputs(inputs);
  graph.SetOutputs(outputs);

  Ort::AllocatorWithDefaultOptions allocator;
  const int64_t w_shape[2] = {dim0, dim1};
  Ort::Value w = Ort::Value::CreateTensor<float>(allocator, w_shape, 2);
  std::memcpy(w.GetTensorMutableData<float>(), weight, sizeof(float) * static_cast<size_t>(dim0 * dim1));
  graph.AddInitializer("W", w, false);
  std::vector<std::string> gemm_inputs{"x", "W"};
  if (!bias.empty()) {
    const int64_t c_shape[1] = {m};
    Ort::Value c = Ort::Value::CreateTensor<float>(allocator, c_shape, 1);
    std::memcpy(c.GetTensorMutableData<float>(), bias.data(), sizeof(float) * static_cast<size_t>(m));
    graph.AddInitializer("C", c, false);
    gemm_inputs.push_back("C");
  }
  const int64_t trans = trans_b ? 1 : 0;
  std::vector<Ort::OpAttr> attrs;
  attrs.emplace_back("alpha", &alpha, 1, ORT_OP_ATTR_FLOAT);
  attrs.emplace_back("transB", &trans, 1, ORT_OP_ATTR_INT);
  Ort::Node gemm("Gemm", "", "gemm", gemm_inputs, {relu ? std::string("g") : std::string("y")}, attrs);
  graph.AddNode(gemm);
  if (relu) {
    Ort::Node act("Relu", "", "relu", {"g"}, {"y"});
    graph.AddNode(act);
  }
  Ort::Model model({{"", 17}});
  model.AddGraph(graph);
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(threads);
  options.SetInterOpNumThreads(1);
  // Each fallback layer's session has its own intra-op pool (a plugin cannot create ORT's global
  // pools: they need the environment built with them). Its workers must not spin between runs
  // and take cores from the main session's pool and the other layers' pools.
  options.AddConfigEntry("session.intra_op.allow_spinning", "0");
  session_ = Ort::Session(env_, model, options);
}

void DenseFallback::Run(const float* x, int64_t rows, int64_t k, float* y, int64_t m) const {
  auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const int64_t x_shape[2] = {rows, k}, y_shape[2] = {rows, m};
  Ort::Value in = Ort::Value::CreateTensor<float>(memory, const_cast<float*>(x), static_cast<size_t>(rows * k),
                                                  x_shape, 2);
  Ort::Value out = Ort::Value::CreateTensor<float>(memory, y, static_cast<size_t>(rows * m), y_shape, 2);
  const char* in_names[] = {"x"};
  const char* out_names[] = {"y"};
  const_cast<Ort::Session&>(session_).Run(Ort::RunOptions{nullptr}, in_names, &in, 1, out_names, &out, 1);
}

}  // namespace onnxslim_ep
