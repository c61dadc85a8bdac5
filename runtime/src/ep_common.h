// Shared by the execution-provider files (ep_*.cc): ORT API access, option names, status helpers.
// The ORT headers come from the pinned download (runtime/build_ep.py); ORT_API_MANUAL_INIT is
// defined on the command line so the C++ wrappers never reference OrtGetApiBase: the API table
// arrives through CreateEpFactories and the library does not link libonnxruntime.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "sparse_kernels.h"

namespace onnxslim_ep {

// The graph / plugin-EP entry points used here exist from API 23; 24 (onnxruntime 1.24) is the
// oldest release this EP is tested against and the oldest it accepts.
constexpr uint32_t kMinOrtApiVersion = 24;
constexpr const char* kEpName = "OnnxSlimSparseEP";
constexpr const char* kEpVendor = "onnxslim-cnn";
constexpr const char* kEpVersion = "0.1.0";

// Provider options (add_provider_for_devices(..., {"min_sparsity": "0.6"})).
constexpr const char* kOptMinSparsity = "min_sparsity";  // claim a weight with >= this share of zeros
constexpr const char* kOptFormat = "format";              // auto | csr | block1x4 | block4x1 | dense
constexpr const char* kOptMaxFormats = "max_formats";     // 1..3 formats kept per layer, one per N regime
constexpr const char* kOptDenseFallback = "dense_fallback";  // off | auto | always
constexpr const char* kOptThreads = "intra_op_threads";   // the session's intra-op threads, for the fallback
// Fallback for min_sparsity; the Python side passes the measured break-even explicitly.
constexpr float kDefaultMinSparsity = 0.8f;  // = runtime.DEFAULT_MIN_SPARSITY

struct Apis {
  const OrtApi* ort = nullptr;
  const OrtEpApi* ep = nullptr;
};
const Apis& GetApis();

inline OrtStatus* MakeStatus(const std::string& msg, OrtErrorCode code = ORT_EP_FAIL) {
  return GetApis().ort->CreateStatus(code, msg.c_str());
}

// ChooseFormat's counts of each weight, from GetCapability to Compile (one pass over a weight,
// not two): initializer name + the kernels' rows x cols and orientation (ep_graph.cc WeightCounts)
// -> (its data pointer, counts).
struct WeightCountsCache {
  std::mutex mutex;
  std::map<std::string, std::pair<const float*, onnxslim_sparse::FormatCounts>> by_weight;
};

struct EpConfig {
  float min_sparsity = kDefaultMinSparsity;
  int format = -1;  // -1 = auto (SparseMatrix::ChooseFormat), else onnxslim_sparse::Format
  // Distinct formats a Gemm/MatMul weight may be held in, for products of 1, 2..8 and > 8
  // columns (ep_weight.h); 1 = only the declared batch's format (= runtime.DEFAULT_MAX_FORMATS).
  int max_formats = 1;
  // ORT's MLAS (ep_fallback.h) for the column regimes where it beats the sparse format:
  // 0 off, 1 auto (cost model), 2 always (every regime of every x * W layer; for tests).
  int dense_fallback = 1;
  int threads = 0;  // intra-op threads of the fallback's private session (0 = ORT's default)
  std::shared_ptr<WeightCountsCache> counts = std::make_shared<WeightCountsCache>();
};

}  // namespace onnxslim_ep

#define ONNXSLIM_EP_TRY try {
#define ONNXSLIM_EP_CATCH                                                                   \
  }                                                                                         \
  catch (const Ort::Exception& ex) {                                                        \
    return onnxslim_ep::MakeStatus(ex.what(), ex.GetOrtErrorCode());                        \
  }                                                                                         \
  catch (const std::exception& ex) {                                                        \
    return onnxslim_ep::MakeStatus(ex.what());                                              \
  }                                                                                         \
  catch (...) {                                                                             \
    return onnxslim_ep::MakeStatus("unknown C++ exception in " + std::string(__func__));    \
  }
