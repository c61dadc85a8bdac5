// The plugin library's entry points (CreateEpFactories / ReleaseEpFactory), its factory and the
// OrtEp itself. The EP runs on the CPU with ORT's default CPU allocator and no streams, so the
// factory answers "none" to allocator / data-transfer / stream requests.
#include <cstdlib>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <memory>
#include <string>
#include <vector>

#include "ep_common.h"
#include "ep_graph.h"
#include "ep_ops.h"
#include "ep_weight.h"

#if defined(_WIN32)
#define ONNXSLIM_EXPORT extern "C" __declspec(dllexport)
#else
#define ONNXSLIM_EXPORT extern "C" __attribute__((visibility("default")))
#endif

namespace onnxslim_ep {

namespace {
Apis g_apis;
}
const Apis& GetApis() { return g_apis; }

namespace {

// One compiled group: ORT asks for a state per session run context; the op itself is the state.
struct ComputeInfo : OrtNodeComputeInfo {
  std::unique_ptr<SparseOp> op;

  explicit ComputeInfo(std::unique_ptr<SparseOp> compiled) : OrtNodeComputeInfo{}, op(std::move(compiled)) {
    ort_version_supported = ORT_API_VERSION;
    CreateState = [](OrtNodeComputeInfo* self, OrtNodeComputeContext*, void** state) noexcept -> OrtStatus* {
      *state = static_cast<ComputeInfo*>(self)->op.get();
      return nullptr;
    };
    Compute = [](OrtNodeComputeInfo*, void* state, OrtKernelContext* context) noexcept -> OrtStatus* {
      ONNXSLIM_EP_TRY
      Ort::KernelContext ctx(context);
      static_cast<const SparseOp*>(state)->Compute(ctx);
      return nullptr;
      ONNXSLIM_EP_CATCH
    };
    ReleaseState = [](OrtNodeComputeInfo*, void*) noexcept {};
  }
};

std::string ConfigEntry(const OrtSessionOptions* options, const std::string& key) {
  // Provider options reach the EP as session entries "ep.<ep name>.<key>"; ORT versions differ in
  // whether the name is lower-cased, so both spellings are read.
  std::string lower = kEpName;
  for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const std::string& full : {std::string("ep.") + kEpName + "." + key, "ep." + lower + "." + key}) {
    int has = 0;
    OrtStatus* st = g_apis.ort->HasSessionConfigEntry(options, full.c_str(), &has);
    if (st != nullptr) {
      g_apis.ort->ReleaseStatus(st);
      continue;
    }
    if (!has) continue;
    size_t size = 0;
    st = g_apis.ort->GetSessionConfigEntry(options, full.c_str(), nullptr, &size);
    if (st != nullptr) g_apis.ort->ReleaseStatus(st);
    std::string value(size, '\0');
    st = g_apis.ort->GetSessionConfigEntry(options, full.c_str(), value.data(), &size);
    if (st != nullptr) {
      g_apis.ort->ReleaseStatus(st);
      continue;
    }
    value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
    return value;
  }
  return {};
}

OrtStatus* ParseConfig(const OrtSessionOptions* options, EpConfig& config) {
  const std::string min_sparsity = ConfigEntry(options, kOptMinSparsity);
  if (!min_sparsity.empty()) {
    char* end = nullptr;
    const double v = std::strtod(min_sparsity.c_str(), &end);
    if (end == min_sparsity.c_str() || *end != '\0' || !(v >= 0.0 && v <= 1.0))
      return MakeStatus(std::string(kEpName) + ": min_sparsity must be a number in [0, 1], got '" + min_sparsity + "'",
                        ORT_INVALID_ARGUMENT);
    config.min_sparsity = static_cast<float>(v);
  }
  const std::string max_formats = ConfigEntry(options, kOptMaxFormats);
  if (!max_formats.empty()) {
    if (max_formats != "1" && max_formats != "2" && max_formats != "3")
      return MakeStatus(std::string(kEpName) + ": max_formats must be 1, 2 or 3, got '" + max_formats + "'",
                        ORT_INVALID_ARGUMENT);
    config.max_formats = max_formats[0] - '0';
  }
  const std::string fallback = ConfigEntry(options, kOptDenseFallback);
  if (fallback == "off") config.dense_fallback = 0;
  else if (fallback.empty() || fallback == "auto") config.dense_fallback = 1;
  else if (fallback == "always") config.dense_fallback = 2;
  else
    return MakeStatus(std::string(kEpName) + ": dense_fallback must be off, auto or always, got '" + fallback + "'",
                      ORT_INVALID_ARGUMENT);
  const std::string threads = ConfigEntry(options, kOptThreads);
  if (!threads.empty()) {
    char* end = nullptr;
    const long v = std::strtol(threads.c_str(), &end, 10);
    if (end == threads.c_str() || *end != '\0' || v < 0 || v > 4096)
      return MakeStatus(std::string(kEpName) + ": intra_op_threads must be an integer >= 0, got '" + threads + "'",
                        ORT_INVALID_ARGUMENT);
    config.threads = static_cast<int>(v);
  }
  const std::string format = ConfigEntry(options, kOptFormat);
  if (format.empty() || format == "auto") config.format = -1;
  else if (format == "csr") config.format = static_cast<int>(onnxslim_sparse::Format::kCSR);
  else if (format == "block1x4") config.format = static_cast<int>(onnxslim_sparse::Format::kBlock1x4);
  else if (format == "block4x1") config.format = static_cast<int>(onnxslim_sparse::Format::kBlock4x1);
  else if (format == "dense") config.format = static_cast<int>(onnxslim_sparse::Format::kDense);
  else
    return MakeStatus(std::string(kEpName) + ": format must be auto, csr, block1x4, block4x1 or dense, got '" +
                          format + "'",
                      ORT_INVALID_ARGUMENT);
  return nullptr;
}

const char* FormatName(onnxslim_sparse::Format f) {
  switch (f) {
    case onnxslim_sparse::Format::kCSR: return "csr";
    case onnxslim_sparse::Format::kBlock1x4: return "block1x4";
    case onnxslim_sparse::Format::kBlock4x1: return "block4x1";
    case onnxslim_sparse::Format::kDense: return "dense";
  }
  return "?";
}

struct SparseEp : OrtEp {
  EpConfig config;
  const OrtLogger* logger;

  SparseEp(const EpConfig& cfg, const OrtLogger* log) : OrtEp{}, config(cfg), logger(log) {
    ort_version_supported = ORT_API_VERSION;
    GetName = [](const OrtEp*) noexcept -> const char* { return kEpName; };
    GetCapability = GetCapabilityImpl;
    Compile = CompileImpl;
    ReleaseNodeComputeInfos = [](OrtEp*, OrtNodeComputeInfo** infos, size_t count) noexcept {
      for (size_t i = 0; i < count; ++i) delete static_cast<ComputeInfo*>(infos[i]);
    };
  }

  void Log(OrtLoggingLevel level, const std::string& msg) const {
    OrtStatus* st = g_apis.ort->Logger_LogMessage(logger, level, msg.c_str(), __FILE__, __LINE__, "SparseEp");
    if (st != nullptr) g_apis.ort->ReleaseStatus(st);
  }

  static OrtStatus* ORT_API_CALL GetCapabilityImpl(OrtEp* self, const OrtGraph* graph,
                                                   OrtEpGraphSupportInfo* support) noexcept {
    ONNXSLIM_EP_TRY
    auto* ep = static_cast<SparseEp*>(self);
    for (const auto& group : FindClaims(Ort::ConstGraph{graph}, ep->config)) {
      OrtNodeFusionOptions fusion{};
      fusion.ort_version_supported = ORT_API_VERSION;
      fusion.drop_constant_initializers = true;  // the compiled op keeps its own (sparse) copy
      std::vector<const OrtNode*> nodes;
      for (const auto& n : group) nodes.push_back(n);
      Ort::Status status{g_apis.ep->EpGraphSupportInfo_AddNodesToFuse(support, nodes.data(), nodes.size(), &fusion)};
      if (!status.IsOK()) return status.release();
    }
    return nullptr;
    ONNXSLIM_EP_CATCH
  }

  static OrtStatus* ORT_API_CALL CompileImpl(OrtEp* self, const OrtGraph** graphs, const OrtNode** fused_nodes,
                                             size_t count, OrtNodeComputeInfo** infos,
                                             OrtNode** /*ep_context_nodes*/) noexcept {
    ONNXSLIM_EP_TRY
    auto* ep = static_cast<SparseEp*>(self);
    for (size_t i = 0; i < count; ++i) infos[i] = nullptr;
    for (size_t i = 0; i < count; ++i) {
      auto op = BuildSparseOp(Ort::ConstGraph{graphs[i]}, Ort::ConstNode{fused_nodes[i]}, ep->config);
      ep->Log(ORT_LOGGING_LEVEL_INFO, std::string(kEpName) + " compiled " + op->name + ": " + op->Describe());
      if (const auto* layer = dynamic_cast<const LayerWeight*>(op->w.get()))
        ep->Log(ORT_LOGGING_LEVEL_INFO, std::string(kEpName) + " " + op->name + " formats by product columns: n=1 " +
                                            FormatName(layer->FormatFor(1)) + ", n=2..8 " +
                                            FormatName(layer->FormatFor(8)) + ", n>8 " +
                                            FormatName(layer->FormatFor(64)) + "; " +
                                            std::to_string(layer->FormatCount()) + " held, " +
                                            std::to_string(layer->bytes()) + " bytes; MLAS for" +
                                            (op->fallback_for[0] ? " n=1" : "") + (op->fallback_for[1] ? " n=2..8" : "") +
                                            (op->fallback_for[2] ? " n>8" : "") + (op->fallback ? "" : " none"));
      infos[i] = new ComputeInfo(std::move(op));
    }
#if defined(__GLIBC__)
    // Building the formats freed transposition panels and grown vectors inside the heap; hand
    // that back to the OS now rather than leaving it in the process's RSS.
    malloc_trim(0);
#endif
    return nullptr;
    ONNXSLIM_EP_CATCH
  }
};

struct SparseEpFactory : OrtEpFactory {
  const OrtLogger* default_logger;

  explicit SparseEpFactory(const OrtLogger* logger) : OrtEpFactory{}, default_logger(logger) {
    ort_version_supported = ORT_API_VERSION;
    GetName = [](const OrtEpFactory*) noexcept -> const char* { return kEpName; };
    GetVendor = [](const OrtEpFactory*) noexcept -> const char* { return kEpVendor; };
    GetVendorId = [](const OrtEpFactory*) noexcept -> uint32_t { return 0; };
    GetVersion = [](const OrtEpFactory*) noexcept -> const char* { return kEpVersion; };
    GetSupportedDevices = GetSupportedDevicesImpl;
    CreateEp = CreateEpImpl;
    ReleaseEp = [](OrtEpFactory*, OrtEp* ep) noexcept { delete static_cast<SparseEp*>(ep); };
    ValidateCompiledModelCompatibilityInfo = [](OrtEpFactory*, const OrtHardwareDevice* const*, size_t, const char*,
                                                OrtCompiledModelCompatibility* out) noexcept -> OrtStatus* {
      *out = OrtCompiledModelCompatibility_EP_NOT_APPLICABLE;
      return nullptr;
    };
    CreateAllocator = [](OrtEpFactory*, const OrtMemoryInfo*, const OrtKeyValuePairs*,
                         OrtAllocator** allocator) noexcept -> OrtStatus* {
      *allocator = nullptr;  // ORT's CPU allocator
      return nullptr;
    };
    ReleaseAllocator = [](OrtEpFactory*, OrtAllocator*) noexcept {};
    CreateDataTransfer = [](OrtEpFactory*, OrtDataTransferImpl** out) noexcept -> OrtStatus* {
      *out = nullptr;  // CPU memory only: nothing to copy
      return nullptr;
    };
    IsStreamAware = [](const OrtEpFactory*) noexcept { return false; };
    CreateSyncStreamForDevice = [](OrtEpFactory*, const OrtMemoryDevice*, const OrtKeyValuePairs*,
                                   OrtSyncStreamImpl** stream) noexcept -> OrtStatus* {
      *stream = nullptr;
      return nullptr;
    };
    GetNumCustomOpDomains = [](OrtEpFactory*, size_t* n) noexcept -> OrtStatus* {
      *n = 0;
      return nullptr;
    };
    GetCustomOpDomains = [](OrtEpFactory*, OrtCustomOpDomain**, size_t) noexcept -> OrtStatus* { return nullptr; };
  }

  static OrtStatus* ORT_API_CALL GetSupportedDevicesImpl(OrtEpFactory* self, const OrtHardwareDevice* const* devices,
                                                         size_t num_devices, OrtEpDevice** ep_devices,
                                                         size_t max_ep_devices, size_t* num_ep_devices) noexcept {
    *num_ep_devices = 0;
    for (size_t i = 0; i < num_devices && *num_ep_devices < max_ep_devices; ++i) {
      if (g_apis.ort->HardwareDevice_Type(devices[i]) != OrtHardwareDeviceType_CPU) continue;
      OrtEpDevice* device = nullptr;
      OrtStatus* st = g_apis.ep->CreateEpDevice(self, devices[i], nullptr, nullptr, &device);
      if (st != nullptr) return st;
      ep_devices[(*num_ep_devices)++] = device;
      break;  // one CPU device is enough
    }
    return nullptr;
  }

  static OrtStatus* ORT_API_CALL CreateEpImpl(OrtEpFactory* self, const OrtHardwareDevice* const*,
                                              const OrtKeyValuePairs* const*, size_t, const OrtSessionOptions* options,
                                              const OrtLogger* logger, OrtEp** ep) noexcept {
    ONNXSLIM_EP_TRY
    (void)self;
    EpConfig config;
    if (OrtStatus* st = ParseConfig(options, config)) return st;
    *ep = new SparseEp(config, logger);
    return nullptr;
    ONNXSLIM_EP_CATCH
  }
};

}  // namespace
}  // namespace onnxslim_ep

ONNXSLIM_EXPORT OrtStatus* CreateEpFactories(const char* /*registered_name*/, const OrtApiBase* api_base,
                                             const OrtLogger* default_logger, OrtEpFactory** factories,
                                             size_t max_factories, size_t* num_factories) {
  using namespace onnxslim_ep;
  *num_factories = 0;
  // GetApi returns null for a version newer than the running ORT: that is the "too old" case.
  const OrtApi* api = api_base->GetApi(kMinOrtApiVersion);
  const char* version = api_base->GetVersionString();
  if (api == nullptr) {
    // Every ORT serves API 1, enough to say why we refuse.
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string(kEpName) + " needs onnxruntime >= 1.24 (C API " +
                            std::to_string(kMinOrtApiVersion) + "); this onnxruntime is " + version;
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  g_apis.ort = api;
  g_apis.ep = api->GetEpApi();
  Ort::InitApi(api);
  if (g_apis.ep == nullptr)
    return api->CreateStatus(ORT_FAIL, (std::string(kEpName) + " needs onnxruntime >= 1.24 with the plugin EP API; "
                                        "this onnxruntime is " + version).c_str());
  if (max_factories < 1) return api->CreateStatus(ORT_INVALID_ARGUMENT, "no room for the sparse EP factory");
  factories[0] = new SparseEpFactory(default_logger);
  *num_factories = 1;
  return nullptr;
}

ONNXSLIM_EXPORT OrtStatus* ReleaseEpFactory(OrtEpFactory* factory) {
  delete static_cast<onnxslim_ep::SparseEpFactory*>(factory);
  return nullptr;
}
