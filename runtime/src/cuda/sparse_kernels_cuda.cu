// CUDA side of the sparse kernels: Y[M x N] = act(alpha * W[M x K] X[K x N] + bias[M]), W held on
// the device in CSR, X and Y dense row-major device arrays (the same contract as
// ../sparse_kernels.h). A C ABI only, no ORT headers, so the EP (or ctypes in the tests) calls it
// with its own stream and device pointers.
//
// Hand kernels, not cuSPARSE: the toolkit on the build machine has no cuSPARSE headers, and these
// two cover the cases the EP needs with the fused epilogue cuSPARSE SpMM lacks (bias, ReLU):
//   * n == 1 (batch-1 FC, SpMV): one warp per row, lanes stride the row's nonzeros, shuffle sum;
//   * n > 1: a 32 x 4 thread block = 4 rows x 32 consecutive output columns; each thread walks
//     its row's nonzeros and reads X rows coalesced across the warp.
// Build: nvcc -std=c++17 -O3 -shared -Xcompiler -fPIC sparse_kernels_cuda.cu -o libonnxslim_sparse_cuda.so
// (add -gencode arch=compute_90,code=sm_90 etc. for the target GPUs; the default arch's PTX JITs
// on newer ones). Links only cudart.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

thread_local std::string g_last_error;

struct CudaCsr {
  int64_t rows = 0, cols = 0, nnz = 0;
  int64_t* ptr = nullptr;  // device, rows + 1
  int32_t* col = nullptr;  // device, nnz
  float* val = nullptr;    // device, nnz
};

bool Ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  g_last_error = std::string(what) + ": " + cudaGetErrorString(e);
  return false;
}

__device__ __forceinline__ float Finish(float acc, float alpha, const float* bias, int64_t row, int relu) {
  float v = alpha * acc + (bias ? bias[row] : 0.0f);
  return relu && v < 0.0f ? 0.0f : v;
}

__global__ void CsrVectorKernel(const int64_t* __restrict__ ptr, const int32_t* __restrict__ col,
                                const float* __restrict__ val, int64_t rows, const float* __restrict__ x,
                                int64_t ldx, float* __restrict__ y, int64_t ldy, float alpha,
                                const float* __restrict__ bias, int relu) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float acc = 0.0f;
  for (int64_t b = ptr[row] + lane; b < ptr[row + 1]; b += 32) acc += val[b] * x[static_cast<int64_t>(col[b]) * ldx];
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) y[row * ldy] = Finish(acc, alpha, bias, row, relu);
}

__global__ void CsrTileKernel(const int64_t* __restrict__ ptr, const int32_t* __restrict__ col,
                              const float* __restrict__ val, int64_t rows, const float* __restrict__ x, int64_t n,
                              int64_t ldx, float* __restrict__ y, int64_t ldy, float alpha,
                              const float* __restrict__ bias, int relu) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (row >= rows || c >= n) return;
  float acc = 0.0f;
  for (int64_t b = ptr[row]; b < ptr[row + 1]; ++b) acc += val[b] * x[static_cast<int64_t>(col[b]) * ldx + c];
  y[row * ldy + c] = Finish(acc, alpha, bias, row, relu);
}

void Release(CudaCsr* m) {
  if (!m) return;
  cudaFree(m->ptr);
  cudaFree(m->col);
  cudaFree(m->val);
  delete m;
}

}  // namespace

#define OSK_CUDA_API extern "C" __attribute__((visibility("default")))

// Number of usable CUDA devices; 0 (never an error) when there is no driver or no GPU.
OSK_CUDA_API int onnxslim_sparse_cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

OSK_CUDA_API const char* onnxslim_sparse_cuda_last_error() { return g_last_error.c_str(); }

// W (host, dense row-major rows x cols) -> CSR on the current device. NULL on error.
OSK_CUDA_API void* onnxslim_sparse_cuda_create(const float* w, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0 || cols > INT32_MAX || (rows * cols > 0 && !w)) {
    g_last_error = "create: need rows >= 0, 0 <= cols < 2^31 and weights";
    return nullptr;
  }
  std::vector<int64_t> ptr(1, 0);
  std::vector<int32_t> col;
  std::vector<float> val;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      if (w[i * cols + j] != 0.0f) {
        col.push_back(static_cast<int32_t>(j));
        val.push_back(w[i * cols + j]);
      }
    }
    ptr.push_back(static_cast<int64_t>(col.size()));
  }
  auto* m = new CudaCsr;
  m->rows = rows;
  m->cols = cols;
  m->nnz = static_cast<int64_t>(col.size());
  const size_t nz = col.size() ? col.size() : 1;  // keep valid pointers for an all-zero weight
  if (!Ok(cudaMalloc(&m->ptr, ptr.size() * sizeof(int64_t)), "cudaMalloc") ||
      !Ok(cudaMalloc(&m->col, nz * sizeof(int32_t)), "cudaMalloc") ||
      !Ok(cudaMalloc(&m->val, nz * sizeof(float)), "cudaMalloc") ||
      !Ok(cudaMemcpy(m->ptr, ptr.data(), ptr.size() * sizeof(int64_t), cudaMemcpyHostToDevice), "cudaMemcpy") ||
      !Ok(cudaMemcpy(m->col, col.data(), col.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "cudaMemcpy") ||
      !Ok(cudaMemcpy(m->val, val.data(), val.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy")) {
    Release(m);
    return nullptr;
  }
  return m;
}

OSK_CUDA_API int64_t onnxslim_sparse_cuda_nonzeros(const void* m) {
  return m ? static_cast<const CudaCsr*>(m)->nnz : -1;
}
OSK_CUDA_API int64_t onnxslim_sparse_cuda_bytes(const void* m) {
  if (!m) return -1;
  const auto* c = static_cast<const CudaCsr*>(m);
  return (c->rows + 1) * 8 + c->nnz * 8;
}
OSK_CUDA_API void onnxslim_sparse_cuda_free(void* m) { Release(static_cast<CudaCsr*>(m)); }

// Device pointers x (cols x n, row stride ldx), y (rows x n, ldy), bias (rows) or NULL; enqueued
// on `stream` (a cudaStream_t, NULL = default stream). 0 on success, -1 with last_error.
OSK_CUDA_API int onnxslim_sparse_cuda_multiply(const void* handle, const float* x, int64_t n, int64_t ldx, float* y,
                                               int64_t ldy, float alpha, const float* bias, int relu, void* stream) {
  const auto* m = static_cast<const CudaCsr*>(handle);
  if (!m || n < 1 || ldx < n || ldy < n) {
    g_last_error = "multiply: need a matrix, n >= 1, ldx >= n and ldy >= n";
    return -1;
  }
  if (m->rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (n == 1) {
    const int64_t threads = 256, blocks = (m->rows * 32 + threads - 1) / threads;
    CsrVectorKernel<<<static_cast<unsigned>(blocks), threads, 0, s>>>(m->ptr, m->col, m->val, m->rows, x, ldx, y,
                                                                       ldy, alpha, bias, relu);
  } else {
    const dim3 block(32, 4);
    const dim3 grid(static_cast<unsigned>((m->rows + 3) / 4), static_cast<unsigned>((n + 31) / 32));
    CsrTileKernel<<<grid, block, 0, s>>>(m->ptr, m->col, m->val, m->rows, x, n, ldx, y, ldy, alpha, bias, relu);
  }
  return Ok(cudaGetLastError(), "kernel launch") ? 0 : -1;
}

// Host-pointer convenience (tests, bench): copies x/bias in, runs, copies y out, synchronises.
OSK_CUDA_API int onnxslim_sparse_cuda_multiply_host(const void* handle, const float* x, int64_t n, float* y,
                                                    float alpha, const float* bias, int relu) {
  const auto* m = static_cast<const CudaCsr*>(handle);
  if (!m || n < 1) {
    g_last_error = "multiply_host: need a matrix and n >= 1";
    return -1;
  }
  float *dx = nullptr, *dy = nullptr, *db = nullptr;
  const size_t xs = static_cast<size_t>(m->cols * n) * sizeof(float), ys = static_cast<size_t>(m->rows * n) * sizeof(float);
  bool ok = Ok(cudaMalloc(&dx, xs ? xs : 4), "cudaMalloc") && Ok(cudaMalloc(&dy, ys ? ys : 4), "cudaMalloc") &&
            (!bias || Ok(cudaMalloc(&db, m->rows * sizeof(float) + 4), "cudaMalloc")) &&
            Ok(cudaMemcpy(dx, x, xs, cudaMemcpyHostToDevice), "cudaMemcpy") &&
            (!bias || Ok(cudaMemcpy(db, bias, m->rows * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy"));
  ok = ok && onnxslim_sparse_cuda_multiply(handle, dx, n, n, dy, n, alpha, db, relu, nullptr) == 0 &&
       Ok(cudaMemcpy(y, dy, ys, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(db);
  return ok ? 0 : -1;
}
