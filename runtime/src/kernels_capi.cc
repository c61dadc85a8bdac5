// C ABI over sparse_kernels.h so Python (ctypes) can drive the kernels directly, on the EP
// library or on a standalone build of runtime/src/kernels_*.cc. Errors never cross the ABI as
// exceptions: functions return NULL / -1 and onnxslim_sparse_last_error() says why.
//
// The functions are weak symbols so that a build line naming this file twice (it also matches
// the kernels_*.cc glob) still links into one library.
#include <cstdint>
#include <algorithm>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "sparse_kernels.h"

namespace onnxslim_sparse {
namespace detail {
bool SetKernelIsa(const char* name);  // kernels_matrix.cc
}
}  // namespace onnxslim_sparse

namespace {

thread_local std::string g_last_error;

// Splits [0, n) into `threads` contiguous ranges, one std::thread each (the calling thread takes
// the first). Each unit is computed by one thread, so the result does not depend on `threads`.
onnxslim_sparse::ParallelFor ThreadSplit(int threads) {
  if (threads <= 1) return nullptr;
  return [threads](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t parts = std::min<int64_t>(threads, n);
    std::vector<std::thread> pool;
    for (int64_t p = 1; p < parts; ++p) pool.emplace_back(fn, n * p / parts, n * (p + 1) / parts);
    if (parts > 0) fn(0, n / parts);
    for (auto& t : pool) t.join();
  };
}

template <class F>
auto Guard(F&& f, decltype(f()) failure) -> decltype(f()) {
  try {
    g_last_error.clear();
    return f();
  } catch (const std::exception& e) {
    g_last_error = e.what();
  } catch (...) {
    g_last_error = "unknown error";
  }
  return failure;
}

using onnxslim_sparse::SparseMatrix;

const SparseMatrix* AsMatrix(const void* handle) {
  if (!handle) throw std::invalid_argument("null matrix handle");
  return static_cast<const SparseMatrix*>(handle);
}

}  // namespace

#define OSK_API extern "C" __attribute__((visibility("default"), weak))

// Returns a matrix handle (free with onnxslim_sparse_free) or NULL. format: 0 CSR, 1 block 1x4,
// 2 block 4x1, 3 dense, -1 = ChooseFormat(w, rows, cols, n_hint).
OSK_API void* onnxslim_sparse_create(const float* w, int64_t rows, int64_t cols, int format, int64_t n_hint) {
  return Guard(
      [&]() -> void* {
        auto f = format < 0 ? SparseMatrix::ChooseFormat(w, rows, cols, n_hint)
                            : static_cast<onnxslim_sparse::Format>(format);
        return SparseMatrix::FromDense(w, rows, cols, f).release();
      },
      nullptr);
}

OSK_API int onnxslim_sparse_choose_format(const float* w, int64_t rows, int64_t cols, int64_t n_hint) {
  return Guard([&] { return static_cast<int>(SparseMatrix::ChooseFormat(w, rows, cols, n_hint)); }, -1);
}

// Y[rows x n] = act(alpha * W X + bias); relu != 0 applies ReLU; threads <= 1 runs serially.
OSK_API int onnxslim_sparse_multiply(const void* m, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
                                     float alpha, const float* bias, int relu, int threads) {
  return Guard(
      [&] {
        AsMatrix(m)->Multiply(x, n, ldx, y, ldy, alpha, bias,
                              relu ? onnxslim_sparse::Activation::kRelu : onnxslim_sparse::Activation::kNone,
                              ThreadSplit(threads));
        return 0;
      },
      -1);
}

OSK_API int64_t onnxslim_sparse_rows(const void* m) { return Guard([&] { return AsMatrix(m)->rows(); }, -1); }
OSK_API int64_t onnxslim_sparse_cols(const void* m) { return Guard([&] { return AsMatrix(m)->cols(); }, -1); }
OSK_API int64_t onnxslim_sparse_nonzeros(const void* m) {
  return Guard([&] { return AsMatrix(m)->nonzeros(); }, -1);
}
OSK_API int64_t onnxslim_sparse_bytes(const void* m) {
  return Guard([&] { return static_cast<int64_t>(AsMatrix(m)->bytes()); }, -1);
}
OSK_API int onnxslim_sparse_format(const void* m) {
  return Guard([&] { return static_cast<int>(AsMatrix(m)->format()); }, -1);
}
OSK_API void onnxslim_sparse_free(void* m) { delete static_cast<SparseMatrix*>(m); }

// Direct sparse conv (SparseConv): w is [oc][ic][kh][kw]; returns a handle for
// onnxslim_sparse_conv_run / _free, or NULL.
OSK_API void* onnxslim_sparse_conv_create(const float* w, int64_t oc, int64_t ic, int64_t kh, int64_t kw) {
  return Guard([&]() -> void* { return onnxslim_sparse::SparseConv::FromDense(w, oc, ic, kh, kw).release(); },
               nullptr);
}

// geometry: in_h, in_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w (ConvGeometry's order).
OSK_API int onnxslim_sparse_conv_run(const void* conv, const float* x, int64_t batch, const int64_t* geometry,
                                     float* y, const float* bias, int relu, int threads) {
  return Guard(
      [&] {
        if (!conv || !geometry) throw std::invalid_argument("null conv handle or geometry");
        const int64_t* q = geometry;
        const onnxslim_sparse::ConvGeometry g{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]};
        static_cast<const onnxslim_sparse::SparseConv*>(conv)->Run(
            x, batch, g, y, bias, relu ? onnxslim_sparse::Activation::kRelu : onnxslim_sparse::Activation::kNone,
            ThreadSplit(threads));
        return 0;
      },
      -1);
}

OSK_API int64_t onnxslim_sparse_conv_nonzeros(const void* conv) {
  return conv ? static_cast<const onnxslim_sparse::SparseConv*>(conv)->nonzeros() : -1;
}
OSK_API void onnxslim_sparse_conv_free(void* conv) { delete static_cast<onnxslim_sparse::SparseConv*>(conv); }

// Runs of each conv path in this process (0 direct, 1 im2col, 2 pointwise), counted in images.
OSK_API int64_t onnxslim_sparse_conv_path_runs(int which) { return onnxslim_sparse::ConvPathRuns(which); }

OSK_API double onnxslim_sparse_conv_relative_cost(int64_t nnz, int64_t oc, int64_t ic, int64_t kh, int64_t kw,
                                                  int64_t out_h, int64_t out_w, int64_t in_h, int64_t in_w,
                                                  int direct) {
  return onnxslim_sparse::ConvRelativeCost(nnz, oc, ic, kh, kw, out_h, out_w, in_h, in_w, direct != 0);
}

// "avx2+fma" or "portable" (a static string).
OSK_API const char* onnxslim_sparse_isa() {
  return onnxslim_sparse::KernelIsa() == "avx2+fma" ? "avx2+fma" : "portable";
}

// "auto", "portable" or "avx2+fma"; 0 on success, -1 (nothing changed) otherwise.
OSK_API int onnxslim_sparse_set_isa(const char* name) {
  if (name && onnxslim_sparse::detail::SetKernelIsa(name)) return 0;
  g_last_error = std::string("unknown ISA or not supported by this CPU: ") + (name ? name : "(null)");
  return -1;
}

OSK_API const char* onnxslim_sparse_last_error() { return g_last_error.c_str(); }
