// CUDA kernel of grid training (and, with one head, of train_head's linear head).
//
// Per mini-batch, on one stream:
//   1. gather_batch   rows order[s*B ..] of X into a (count x D) block in the GEMM's input type
//                     (bf16 and fp16 features stay 16-bit; float64 becomes float32)
//   2. cuBLAS GEMM    Z (count x H*C, fp32) = xb W^T for all heads at once (fp32 accumulation)
//   3. ce_grad        fused bias + softmax cross-entropy + dL/dZ per (row, head); per-row losses
//                     and hits go to epoch-long buffers that the host sums in order
//   4. bias_grad      column sums of dZ times the batch's 1/sum(weights)
//   5. cuBLAS GEMM    gW (H*C x D, fp32) = (1/sum w) dZ^T xb
//   6. optimizer_step SGD (momentum, Nesterov, weight decay) or AdamW on the fp32 master weights,
//                     refreshing the 16-bit copy the next forward GEMM reads
// Everything that changes from step to step (rows, 1/sum(weights), learning rates, bias
// corrections) is read from device arrays the host fills once per epoch, so an epoch's launches
// can be captured once into a CUDA graph and replayed every epoch: at ImageNet scale an epoch is
// ~5,000 steps of ~6 small launches, where launch overhead would otherwise dominate.
//
// The host computes the epoch order (common/rng.h), the schedule (lr_factor) and the batch
// normalisers exactly as the CPU trainer does, so both follow the same trajectory up to float32
// summation order (and the 16-bit rounding of the GEMM inputs for bf16/fp16 features).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/cuda_check.cuh"
#include "common/cuda_util.cuh"
#include "common/head_checks.h"
#include "common/rng.h"
#include "common/train_loop.h"
#include "head_grid/head_grid.h"

namespace pyft {
namespace cuda {
namespace {

struct StepScalars {
  float inv_denom;  ///< 1 / sum of the batch's class weights
  float bc2_sqrt;   ///< AdamW: sqrt(1 - beta2^t)
  int first;        ///< SGD: first step ever (initialises the momentum buffer)
  int pad;
};

struct HeadScalars {
  float lr;         ///< lrs[h] * schedule factor
  float step_size;  ///< AdamW: lr / (1 - beta1^t)
};

struct OptConst {
  int adamw;
  int has_momentum;
  float momentum, dampening;
  int nesterov;
  float one_minus_beta1, beta2, one_minus_beta2, eps;
};

// ---------------------------------------------------------------------------------------------
// Kernels

/// xb[r, :] = Tc(X[rows[r], :]) for r < count; one block per row.
template <typename Tin, typename Tc>
__global__ void gather_batch(const char* __restrict__ X, int64_t row_stride,
                             const int64_t* __restrict__ rows, int64_t count, int64_t D,
                             Tc* __restrict__ xb) {
  for (int64_t r = blockIdx.x; r < count; r += gridDim.x) {
    const Tin* src = reinterpret_cast<const Tin*>(X + rows[r] * row_stride);
    Tc* dst = xb + r * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) dst[j] = convert<Tc>(src[j]);
  }
}

/// Same-type gather with 16-byte copies (rows 16-byte aligned, D * sizeof(T) % 16 == 0).
__global__ void gather_batch_vec(const char* __restrict__ X, int64_t row_stride,
                                 const int64_t* __restrict__ rows, int64_t count,
                                 int64_t row_vecs, uint4* __restrict__ xb) {
  for (int64_t r = blockIdx.x; r < count; r += gridDim.x) {
    const uint4* src = reinterpret_cast<const uint4*>(X + rows[r] * row_stride);
    uint4* dst = xb + r * row_vecs;
    for (int64_t k = threadIdx.x; k < row_vecs; k += blockDim.x) dst[k] = __ldg(src + k);
  }
}

/// Softmax cross-entropy of head blockIdx.y on row blockIdx.x of Z (count x H*C, no bias yet).
/// WithGrad: Z's block becomes dL/dz before the batch normaliser (w_y (p - onehot), with label
/// smoothing and class weights as in common/head_math), also written to dz16 when non-null.
/// Loss (weighted, unnormalised) and hit go to loss_out / hit_out[(pos0 + r) * H + h]; a
/// non-finite logit sets *nonfinite.
template <bool WithGrad, typename Tc>
__global__ void ce_rows(float* __restrict__ Z, Tc* __restrict__ dz16,
                        const float* __restrict__ bias, const int64_t* __restrict__ labels,
                        const int64_t* __restrict__ rows, int64_t C, int64_t HC,
                        const float* __restrict__ class_weights, float eps, float wsum_all,
                        int64_t pos0, int64_t H, float* __restrict__ loss_out,
                        uint8_t* __restrict__ hit_out, int* __restrict__ nonfinite) {
  __shared__ float sf[32];
  __shared__ int64_t si[32];
  const int64_t r = blockIdx.x, h = blockIdx.y;
  float* z = Z + r * HC + h * C;
  const float* bh = bias + h * C;
  const int64_t y = labels[rows[r]];

  float mx = -INFINITY;
  int64_t arg = INT64_MAX;
  bool finite = true;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = z[c] + bh[c];
    finite &= isfinite(v);
    if (arg == INT64_MAX || v > mx) {  // a thread's first value always counts, as argmax's z[0]
      mx = v;
      arg = c;
    }
  }
  const bool all_finite = __syncthreads_and(finite);
  block_argmax(&mx, &arg, sf, si);
  float se = 0.0f, swz = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = z[c] + bh[c] - mx;
    se += expf(v);
    if (eps > 0.0f) swz += (class_weights ? class_weights[c] : 1.0f) * v;
  }
  se = block_sum(se, sf);
  if (eps > 0.0f) swz = block_sum(swz, sf);
  const float lse = logf(se);  // of the shifted logits
  const float wy = class_weights ? class_weights[y] : 1.0f;
  const float inv_se = 1.0f / se;
  const float A = (1.0f - eps) * wy + eps / static_cast<float>(C) * wsum_all;
  Tc* d16 = (WithGrad && dz16) ? dz16 + r * HC + h * C : nullptr;
  // Each thread reads and then overwrites only its own columns, so the owner of column y reads
  // the label's logit before anyone changes it.
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = z[c] + bh[c] - mx;
    if (c == y) {
      double l = (1.0 - eps) * wy * static_cast<double>(lse - v);
      if (eps > 0.0f) l += static_cast<double>(eps) / C * (static_cast<double>(lse) * wsum_all - swz);
      const int64_t o = (pos0 + r) * H + h;
      loss_out[o] = static_cast<float>(l);
      hit_out[o] = arg == y;
    }
    if (WithGrad) {
      const float p = expf(v) * inv_se;
      float g;
      if (eps > 0.0f) {
        const float wc = class_weights ? class_weights[c] : 1.0f;
        g = A * p - (eps / static_cast<float>(C) * wc + (c == y ? (1.0f - eps) * wy : 0.0f));
      } else {
        g = wy * p - (c == y ? wy : 0.0f);
      }
      z[c] = g;
      if (d16) d16[c] = from_f32<Tc>(g);
    }
  }
  if (!all_finite && threadIdx.x == 0) atomicOr(nonfinite, 1);
}

/// gb[j] = inv_denom * sum_r dZ[r, j]: 32 columns per block, rows split over threadIdx.y.
__global__ void bias_grad(const float* __restrict__ dZ, int64_t count, int64_t HC,
                          const StepScalars* __restrict__ st, float* __restrict__ gb) {
  __shared__ float part[16][33];
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  float s = 0.0f;
  if (j < HC)
    for (int64_t r = threadIdx.y; r < count; r += blockDim.y) s += dZ[r * HC + j];
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < HC) {
    float t = 0.0f;
    for (int k = 0; k < static_cast<int>(blockDim.y); ++k) t += part[k][threadIdx.x];
    gb[j] = t * st->inv_denom;
  }
}

/// One optimizer step on all heads: W (HC x D) then b (HC), flat index i; head h's lr and weight
/// decay from hs[h] / wd[h]. Same arithmetic, in the same order, as common/optim.cpp.
template <typename Tc>
__global__ void optimizer_step(float* __restrict__ W, float* __restrict__ b,
                               const float* __restrict__ gW, const float* __restrict__ gb,
                               float* __restrict__ mW, float* __restrict__ vW,
                               float* __restrict__ mb, float* __restrict__ vb,
                               Tc* __restrict__ W16, int64_t HC, int64_t D, int64_t C,
                               const StepScalars* __restrict__ st,
                               const HeadScalars* __restrict__ hs, const float* __restrict__ wd,
                               OptConst k) {
  const int64_t nW = HC * D, n = nW + HC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const bool is_w = i < nW;
    const int64_t j = is_w ? i : i - nW;
    const int64_t h = is_w ? i / (C * D) : j / C;
    float* p = is_w ? W + j : b + j;
    const float g = is_w ? gW[j] : gb[j];
    const float lr = hs[h].lr;
    const float decay_w = is_w ? wd[h] : 0.0f;
    float x = *p;
    if (k.adamw) {
      float* m = is_w ? mW + j : mb + j;
      float* v = is_w ? vW + j : vb + j;
      if (decay_w != 0.0f) x *= 1.0f - lr * decay_w;
      const float mm = *m + k.one_minus_beta1 * (g - *m);
      const float vv = *v * k.beta2 + k.one_minus_beta2 * g * g;
      *m = mm;
      *v = vv;
      const float denom = sqrtf(vv) / st->bc2_sqrt + k.eps;
      x += -hs[h].step_size * (mm / denom);
    } else {
      float d = g;
      if (decay_w != 0.0f) d += decay_w * x;
      if (k.has_momentum) {
        float* m = is_w ? mW + j : mb + j;
        const float buf = st->first ? d : k.momentum * *m + (1.0f - k.dampening) * d;
        *m = buf;
        d = k.nesterov ? d + k.momentum * buf : buf;
      }
      x -= lr * d;
    }
    *p = x;
    if (W16 && is_w) W16[j] = from_f32<Tc>(x);
  }
}

template <typename Tc>
__global__ void to_compute_type(const float* __restrict__ src, Tc* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = from_f32<Tc>(src[i]);
}

/// First (row-major) non-finite element of X, as an index row * cols + col (ULLONG_MAX: none).
template <typename T>
__global__ void find_nonfinite(const char* __restrict__ X, int64_t row_stride, int64_t rows,
                               int64_t cols, unsigned long long* first) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = reinterpret_cast<const T*>(X + r * row_stride);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      if (!isfinite(to_f32(row[c])))
        atomicMin(first, static_cast<unsigned long long>(r * cols + c));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

int grid_blocks(int64_t n, int threads, int64_t cap = 1 << 16) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, cap)));
}

template <typename T>
void upload(T* dst, const T* src, int64_t n, cudaStream_t s) {
  if (n > 0)
    PYFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(T),
                                    cudaMemcpyHostToDevice, s));
}

template <typename T>
void download(T* dst, const T* src, int64_t n, cudaStream_t s) {
  if (n > 0)
    PYFT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(T),
                                    cudaMemcpyDeviceToHost, s));
}

struct CublasHandle {
  cublasHandle_t h = nullptr;
  CublasHandle() { PYFT_CUBLAS_CHECK(cublasCreate(&h)); }
  ~CublasHandle() {
    if (h) cublasDestroy(h);
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { PYFT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s) cudaStreamDestroy(s);
  }
};

struct Event {
  cudaEvent_t e = nullptr;
  Event() { PYFT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  ~Event() {
    if (e) cudaEventDestroy(e);
  }
};

struct Graph {
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
    if (g) cudaGraphDestroy(g);
  }
};

template <typename T>
cudaDataType_t cuda_type();
template <>
cudaDataType_t cuda_type<float>() { return CUDA_R_32F; }
template <>
cudaDataType_t cuda_type<__half>() { return CUDA_R_16F; }
template <>
cudaDataType_t cuda_type<__nv_bfloat16>() { return CUDA_R_16BF; }

/// The whole run for one compute type Tc (the GEMM input type) and feature type Tin.
template <typename Tin, typename Tc>
class GridTrainer {
 public:
  GridTrainer(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
              const double* wds, const Matrix& X, const int64_t* labels, const RowSubset& subset,
              const ValidationSet& val, const LossSpec& loss, const TrainOptions& opt)
      : spec_(spec), H_(heads), params_(params), lrs_(lrs), wds_(wds), X_(X), labels_(labels),
        subset_(subset), val_(val), loss_(loss), opt_(opt) {
    C_ = spec.classes;
    D_ = spec.in_features;
    HC_ = H_ * C_;
    const StepPlan plan(opt, subset.rows ? subset.count : X.rows);
    N_ = plan.rows;
    B_ = plan.batch;
    S_ = plan.steps_per_epoch;
    total_ = plan.total_steps;
    half_ = !std::is_same<Tc, float>::value;
    // Validation rows per GEMM: the logits block stays under ~256 MB.
    VC_ = std::max<int64_t>(1, std::min<int64_t>(4096, (int64_t(64) << 20) / HC_));
  }

  GridResult run(const GridEpochCallback& on_epoch, const InterruptCheck& interrupted,
                 StreamHandle caller) {
    allocate();
    // Ordered after the caller's stream (its pending writes to X), on a stream of our own: graph
    // capture is not allowed on the legacy default stream a caller may be using.
    Event ready;
    PYFT_CUDA_CHECK(cudaEventRecord(ready.e, as_stream(caller)));
    PYFT_CUDA_CHECK(cudaStreamWaitEvent(work_.s, ready.e, 0));
    setup();
    const bool use_graph = opt_.cuda_graphs && opt_.epochs >= 2;
    GridResult res;
    int64_t step = 0;
    bool features_verified = false, val_verified = false;
    std::vector<int64_t> order(N_);
    std::vector<StepScalars> step_h(S_);
    std::vector<HeadScalars> head_h(S_ * H_);
    std::vector<float> rowloss(N_ * H_);
    std::vector<uint8_t> rowhit(N_ * H_);
    std::vector<double> inv_denom(S_);
    for (int64_t epoch = 0; epoch < opt_.epochs; ++epoch) {
      const auto t0 = std::chrono::steady_clock::now();
      epoch_rows(opt_.shuffle, opt_.seed, epoch, N_, subset_.rows, order.data());
      double factor = 1.0;
      for (int64_t s = 0; s < S_; ++s) {
        const int64_t count = std::min(B_, N_ - s * B_);
        const double wsum = batch_weight_sum(loss_, labels_, order.data() + s * B_, count);
        inv_denom[s] = 1.0 / wsum;
        const int64_t t = step + s + 1;  // optimizer steps so far, this one included
        factor = lr_factor(opt_, step + s, total_, S_);
        const double bc1 = 1.0 - std::pow(opt_.beta1, static_cast<double>(t));
        const double bc2 = 1.0 - std::pow(opt_.beta2, static_cast<double>(t));
        step_h[s] = {static_cast<float>(inv_denom[s]), static_cast<float>(std::sqrt(bc2)),
                     t == 1 ? 1 : 0, 0};
        for (int64_t h = 0; h < H_; ++h) {
          const double lr = lrs_[h] * factor;
          head_h[s * H_ + h] = {static_cast<float>(lr), static_cast<float>(lr / bc1)};
        }
      }
      upload(order_.get(), order.data(), N_, work_.s);
      upload(step_d_.get(), step_h.data(), S_, work_.s);
      upload(head_d_.get(), head_h.data(), S_ * H_, work_.s);
      PYFT_CUDA_CHECK(cudaMemsetAsync(flag_.get(), 0, sizeof(int), work_.s));
      if (use_graph) {
        if (!graph_.exec) capture_epoch();
        PYFT_CUDA_CHECK(cudaGraphLaunch(graph_.exec, work_.s));
      } else {
        for (int64_t s = 0; s < S_; ++s) {
          enqueue_step(s);
          if (((step + s + 1) & 63) == 0 && poll_interrupt(interrupted, res, epoch, step + s + 1)) {
            finish_params();
            return res;
          }
        }
      }
      step += S_;
      int nonfinite = 0;
      download(rowloss.data(), rowloss_.get(), N_ * H_, work_.s);
      download(rowhit.data(), rowhit_.get(), N_ * H_, work_.s);
      download(&nonfinite, flag_.get(), 1, work_.s);
      PYFT_CUDA_CHECK(cudaStreamSynchronize(work_.s));
      if (nonfinite && !features_verified) {
        // Some logit was NaN or infinite: bad features (an input error, raised here) or
        // diverged weights (training goes on, as on the CPU).
        verify_finite(X_, "features");
        features_verified = true;
      }
      GridEpochStats st;
      st.epoch = epoch;
      st.train_loss.assign(H_, 0.0);
      st.train_accuracy.assign(H_, 0.0);
      for (int64_t h = 0; h < H_; ++h) {
        double loss_sum = 0.0;
        int64_t hits = 0;
        for (int64_t s = 0; s < S_; ++s) {
          const int64_t count = std::min(B_, N_ - s * B_);
          double l = 0.0;
          for (int64_t r = 0; r < count; ++r) {
            const int64_t o = (s * B_ + r) * H_ + h;
            l += rowloss[o];
            hits += rowhit[o];
          }
          loss_sum += l * inv_denom[s] * static_cast<double>(count);
        }
        const int64_t seen = std::min(N_, S_ * B_);
        st.train_loss[h] = per_row(loss_sum, seen);
        st.train_accuracy[h] = per_row(static_cast<double>(hits), seen);
      }
      st.lr_factor = factor;
      st.steps = step;
      if (val_.count > 0) {
        evaluate(st, &val_verified);
        st.has_val = true;
      }
      finish_params();
      st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      res.epochs_run = epoch + 1;
      res.steps = step;
      if (!callback_continues(on_epoch, st, res)) break;
      if (poll_interrupt(interrupted, res)) return res;
    }
    return res;
  }

 private:
  void allocate() {
    const int64_t rows_max = std::max(B_, VC_);
    W_.resize(HC_ * D_);
    b_.resize(HC_);
    gW_.resize(HC_ * D_);
    gb_.resize(HC_);
    if (opt_.optimizer == OptimizerKind::AdamW || opt_.momentum != 0.0) {
      mW_.resize(HC_ * D_);
      mb_.resize(HC_);
    }
    if (opt_.optimizer == OptimizerKind::AdamW) {
      vW_.resize(HC_ * D_);
      vb_.resize(HC_);
    }
    if (half_) {
      W16_.resize(HC_ * D_);
      dz16_.resize(B_ * HC_);
    }
    xb_.resize(rows_max * D_);
    Z_.resize(rows_max * HC_);
    labels_d_.resize(X_.rows);
    order_.resize(N_);
    step_d_.resize(S_);
    head_d_.resize(S_ * H_);
    wd_d_.resize(H_);
    rowloss_.resize(N_ * H_);
    rowhit_.resize(N_ * H_);
    flag_.resize(1);
    consts_.resize(2);  // 1.0f, 0.0f for the GEMMs' alpha / beta (device pointer mode)
    if (loss_.class_weights) cw_.resize(C_);
    if (val_.count > 0) {
      vrows_.resize(val_.count);
      vloss_.resize(val_.count * H_);
      vhit_.resize(val_.count * H_);
      if (val_.X) vlabels_.resize(val_.X->rows);
    }
    workspace_.resize(int64_t(32) << 20);
  }

  void setup() {
    cudaStream_t s = work_.s;
    // cublasSetStream resets the workspace, so the workspace comes after it; a fixed workspace
    // keeps cuBLAS from allocating during graph capture.
    PYFT_CUBLAS_CHECK(cublasSetStream(blas_.h, s));
    PYFT_CUBLAS_CHECK(cublasSetWorkspace(blas_.h, workspace_.get(), workspace_.bytes()));
    PYFT_CUBLAS_CHECK(cublasSetPointerMode(blas_.h, CUBLAS_POINTER_MODE_DEVICE));
    // float32 features multiply in full float32 (no TF32), as the CPU trainer does.
    PYFT_CUBLAS_CHECK(cublasSetMathMode(blas_.h, CUBLAS_DEFAULT_MATH));
    const float consts[2] = {1.0f, 0.0f};
    upload(consts_.get(), consts, 2, s);
    // params (H rows of W (C*D) | b (C)) into the packed W (HC x D) and b (HC).
    const int64_t P = C_ * D_ + C_;
    PYFT_CUDA_CHECK(cudaMemcpy2DAsync(W_.get(), C_ * D_ * 4, params_, P * 4, C_ * D_ * 4, H_,
                                      cudaMemcpyHostToDevice, s));
    PYFT_CUDA_CHECK(cudaMemcpy2DAsync(b_.get(), C_ * 4, params_ + C_ * D_, P * 4, C_ * 4, H_,
                                      cudaMemcpyHostToDevice, s));
    // The GEMMs write Z and gW with beta = 0 (read from device memory, so cuBLAS cannot skip
    // the C operand at launch time): start them at zero, never at uninitialised NaN patterns.
    PYFT_CUDA_CHECK(cudaMemsetAsync(Z_.get(), 0, Z_.bytes(), s));
    PYFT_CUDA_CHECK(cudaMemsetAsync(gW_.get(), 0, gW_.bytes(), s));
    if (mW_.get()) {
      PYFT_CUDA_CHECK(cudaMemsetAsync(mW_.get(), 0, mW_.bytes(), s));
      PYFT_CUDA_CHECK(cudaMemsetAsync(mb_.get(), 0, mb_.bytes(), s));
    }
    if (vW_.get()) {
      PYFT_CUDA_CHECK(cudaMemsetAsync(vW_.get(), 0, vW_.bytes(), s));
      PYFT_CUDA_CHECK(cudaMemsetAsync(vb_.get(), 0, vb_.bytes(), s));
    }
    if (half_) {
      to_compute_type<Tc><<<grid_blocks(HC_ * D_, 256), 256, 0, s>>>(W_.get(), W16_.get(),
                                                                    HC_ * D_);
      PYFT_CUDA_LAUNCH_CHECK();
    }
    upload(labels_d_.get(), labels_, X_.rows, s);
    std::vector<float> wd(H_);
    for (int64_t h = 0; h < H_; ++h) wd[h] = static_cast<float>(wds_[h]);
    upload(wd_d_.get(), wd.data(), H_, s);
    if (loss_.class_weights) {
      upload(cw_.get(), loss_.class_weights, C_, s);
      for (int64_t c = 0; c < C_; ++c) wsum_all_ += loss_.class_weights[c];
    } else {
      wsum_all_ = static_cast<float>(C_);
    }
    if (val_.count > 0) {
      std::vector<int64_t> vr(val_.count);
      for (int64_t i = 0; i < val_.count; ++i) vr[i] = val_.rows ? val_.rows[i] : i;
      upload(vrows_.get(), vr.data(), val_.count, s);
      if (val_.X) upload(vlabels_.get(), val_.labels, val_.X->rows, s);
    }
    // Host vectors above are pageable: their copies are staged before cudaMemcpyAsync returns,
    // but wait anyway so that a failure surfaces here, before any training.
    PYFT_CUDA_CHECK(cudaStreamSynchronize(s));
  }

  void gather(const Matrix& M, const int64_t* rows_d, int64_t count, Tc* out) {
    const int blocks = static_cast<int>(std::min<int64_t>(count, 1 << 20));
    const char* base = static_cast<const char*>(M.data);
    const bool vec = std::is_same<Tin, Tc>::value &&
                     (reinterpret_cast<uintptr_t>(base) & 15u) == 0 && M.row_stride % 16 == 0 &&
                     (D_ * static_cast<int64_t>(sizeof(Tc))) % 16 == 0;
    if (vec) {
      const int64_t row_vecs = D_ * static_cast<int64_t>(sizeof(Tc)) / 16;
      gather_batch_vec<<<blocks, 128, 0, work_.s>>>(base, M.row_stride, rows_d, count, row_vecs,
                                                    reinterpret_cast<uint4*>(out));
    } else {
      gather_batch<Tin, Tc><<<blocks, 256, 0, work_.s>>>(base, M.row_stride, rows_d, count, D_,
                                                          out);
    }
    PYFT_CUDA_LAUNCH_CHECK();
  }

  /// Z (count x HC, row-major fp32) = xb (count x D) W^T: in cuBLAS's column-major terms
  /// Z^T (HC x count) = W (stored D x HC, transposed) xb^T (stored D x count).
  void forward_gemm(int64_t count) {
    const Tc* W = half_ ? W16_.get() : reinterpret_cast<const Tc*>(W_.get());
    PYFT_CUBLAS_CHECK(cublasGemmEx(blas_.h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(HC_),
                                   static_cast<int>(count), static_cast<int>(D_), consts_.get(),
                                   W, cuda_type<Tc>(), static_cast<int>(D_), xb_.get(),
                                   cuda_type<Tc>(), static_cast<int>(D_), consts_.get() + 1,
                                   Z_.get(), CUDA_R_32F, static_cast<int>(HC_),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  int ce_threads() const { return C_ >= 512 ? 256 : (C_ >= 128 ? 128 : 32); }

  void enqueue_step(int64_t s) {
    const int64_t count = std::min(B_, N_ - s * B_);
    const int64_t* rows = order_.get() + s * B_;
    cudaStream_t st = work_.s;
    gather(X_, rows, count, xb_.get());
    forward_gemm(count);
    ce_rows<true, Tc><<<dim3(static_cast<unsigned>(count), static_cast<unsigned>(H_)),
                        ce_threads(), 0, st>>>(
        Z_.get(), half_ ? dz16_.get() : nullptr, b_.get(), labels_d_.get(), rows, C_, HC_,
        cw_.get(), loss_.label_smoothing, wsum_all_, s * B_, H_, rowloss_.get(), rowhit_.get(),
        flag_.get());
    PYFT_CUDA_LAUNCH_CHECK();
    bias_grad<<<static_cast<unsigned>((HC_ + 31) / 32), dim3(32, 16), 0, st>>>(
        Z_.get(), count, HC_, step_d_.get() + s, gb_.get());
    PYFT_CUDA_LAUNCH_CHECK();
    // gW (HC x D, row-major) = inv_denom dZ^T xb: column-major gW^T (D x HC) = xb^T (stored
    // D x count) dZ (stored HC x count, transposed). alpha is the batch's 1/sum(w), read on the
    // device so the captured graph picks up each epoch's values.
    const void* dz = half_ ? static_cast<const void*>(dz16_.get())
                           : static_cast<const void*>(Z_.get());
    PYFT_CUBLAS_CHECK(cublasGemmEx(blas_.h, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(D_),
                                   static_cast<int>(HC_), static_cast<int>(count),
                                   &step_d_.get()[s].inv_denom, xb_.get(), cuda_type<Tc>(),
                                   static_cast<int>(D_), dz, cuda_type<Tc>(),
                                   static_cast<int>(HC_), consts_.get() + 1, gW_.get(),
                                   CUDA_R_32F, static_cast<int>(D_), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
    OptConst k;
    k.adamw = opt_.optimizer == OptimizerKind::AdamW;
    k.has_momentum = opt_.momentum != 0.0;
    k.momentum = static_cast<float>(opt_.momentum);
    k.dampening = static_cast<float>(opt_.dampening);
    k.nesterov = opt_.nesterov;
    k.one_minus_beta1 = static_cast<float>(1.0 - opt_.beta1);
    k.beta2 = static_cast<float>(opt_.beta2);
    k.one_minus_beta2 = static_cast<float>(1.0 - opt_.beta2);
    k.eps = static_cast<float>(opt_.eps);
    const int64_t n = HC_ * D_ + HC_;
    optimizer_step<Tc><<<grid_blocks(n, 256, 132 * 16), 256, 0, st>>>(
        W_.get(), b_.get(), gW_.get(), gb_.get(), mW_.get(), vW_.get(), mb_.get(), vb_.get(),
        half_ ? W16_.get() : nullptr, HC_, D_, C_, step_d_.get() + s, head_d_.get() + s * H_,
        wd_d_.get(), k);
    PYFT_CUDA_LAUNCH_CHECK();
  }

  void capture_epoch() {
    PYFT_CUDA_CHECK(cudaStreamBeginCapture(work_.s, cudaStreamCaptureModeThreadLocal));
    try {
      for (int64_t s = 0; s < S_; ++s) enqueue_step(s);
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(work_.s, &g);  // leave the stream usable; the error is rethrown
      if (g) cudaGraphDestroy(g);
      throw;
    }
    PYFT_CUDA_CHECK(cudaStreamEndCapture(work_.s, &graph_.g));
    PYFT_CUDA_CHECK(cudaGraphInstantiate(&graph_.exec, graph_.g, 0));
  }

  /// Validation loss and accuracy of every head (params of this epoch's end).
  void evaluate(GridEpochStats& st, bool* verified) {
    const Matrix& VX = val_.X ? *val_.X : X_;
    const int64_t* vl = val_.X ? vlabels_.get() : labels_d_.get();
    cudaStream_t s = work_.s;
    PYFT_CUDA_CHECK(cudaMemsetAsync(flag_.get(), 0, sizeof(int), s));
    for (int64_t s0 = 0; s0 < val_.count; s0 += VC_) {
      const int64_t n = std::min(VC_, val_.count - s0);
      gather(VX, vrows_.get() + s0, n, xb_.get());
      forward_gemm(n);
      ce_rows<false, Tc><<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(H_)),
                           ce_threads(), 0, s>>>(Z_.get(), nullptr, b_.get(), vl,
                                                 vrows_.get() + s0, C_, HC_, cw_.get(),
                                                 loss_.label_smoothing, wsum_all_, s0, H_,
                                                 vloss_.get(), vhit_.get(), flag_.get());
      PYFT_CUDA_LAUNCH_CHECK();
    }
    std::vector<float> vloss(val_.count * H_);
    std::vector<uint8_t> vhit(val_.count * H_);
    int nonfinite = 0;
    download(vloss.data(), vloss_.get(), val_.count * H_, s);
    download(vhit.data(), vhit_.get(), val_.count * H_, s);
    download(&nonfinite, flag_.get(), 1, s);
    PYFT_CUDA_CHECK(cudaStreamSynchronize(s));
    if (nonfinite && !*verified) {
      verify_finite(VX, val_.X ? "val_features" : "features");
      *verified = true;
    }
    const int64_t* hl = val_.X ? val_.labels : labels_;
    double wtotal = 0.0;
    for (int64_t i = 0; i < val_.count; ++i)
      wtotal += loss_.weight(hl[val_.rows ? val_.rows[i] : i]);
    st.val_loss.assign(H_, 0.0);
    st.val_accuracy.assign(H_, 0.0);
    for (int64_t h = 0; h < H_; ++h) {
      double l = 0.0;
      int64_t hits = 0;
      for (int64_t i = 0; i < val_.count; ++i) {
        l += vloss[i * H_ + h];
        hits += vhit[i * H_ + h];
      }
      st.val_loss[h] = wtotal > 0 ? l / wtotal : 0.0;
      st.val_accuracy[h] = static_cast<double>(hits) / static_cast<double>(val_.count);
    }
  }

  /// Throws std::invalid_argument naming the first NaN or infinity of M, if it has one.
  void verify_finite(const Matrix& M, const char* name) {
    DeviceBuffer<unsigned long long> first(1);
    PYFT_CUDA_CHECK(cudaMemsetAsync(first.get(), 0xFF, sizeof(unsigned long long), work_.s));
    find_nonfinite<Tin><<<static_cast<unsigned>(std::min<int64_t>(M.rows, 1 << 16)), 256, 0,
                          work_.s>>>(static_cast<const char*>(M.data), M.row_stride, M.rows,
                                     M.cols, first.get());
    PYFT_CUDA_LAUNCH_CHECK();
    unsigned long long at = 0;
    download(&at, first.get(), 1, work_.s);
    PYFT_CUDA_CHECK(cudaStreamSynchronize(work_.s));
    PYFT_CHECK(at == ULLONG_MAX,
               "%s must be finite; found NaN or infinity at row %lld, column %lld", name,
               (long long)(at / M.cols), (long long)(at % M.cols));
  }

  /// Packed W, b back into the caller's params (H rows of W | b), then wait.
  void finish_params() {
    const int64_t P = C_ * D_ + C_;
    PYFT_CUDA_CHECK(cudaMemcpy2DAsync(params_, P * 4, W_.get(), C_ * D_ * 4, C_ * D_ * 4, H_,
                                      cudaMemcpyDeviceToHost, work_.s));
    PYFT_CUDA_CHECK(cudaMemcpy2DAsync(params_ + C_ * D_, P * 4, b_.get(), C_ * 4, C_ * 4, H_,
                                      cudaMemcpyDeviceToHost, work_.s));
    PYFT_CUDA_CHECK(cudaStreamSynchronize(work_.s));
  }

  const HeadSpec& spec_;
  int64_t H_;
  float* params_;
  const double* lrs_;
  const double* wds_;
  const Matrix& X_;
  const int64_t* labels_;
  const RowSubset& subset_;
  const ValidationSet& val_;
  const LossSpec& loss_;
  const TrainOptions& opt_;
  int64_t C_ = 0, D_ = 0, HC_ = 0, N_ = 0, B_ = 0, S_ = 0, total_ = 0, VC_ = 0;
  bool half_ = false;
  float wsum_all_ = 0.0f;

  // Declared before the buffers so that they are destroyed after them (the graph references
  // the buffers; the stream must outlive nothing).
  Stream work_;
  CublasHandle blas_;
  DeviceBuffer<float> W_, b_, gW_, gb_, mW_, mb_, vW_, vb_, Z_, rowloss_, vloss_, cw_, wd_d_,
      consts_;
  DeviceBuffer<Tc> W16_, dz16_, xb_;
  DeviceBuffer<int64_t> labels_d_, order_, vrows_, vlabels_;
  DeviceBuffer<StepScalars> step_d_;
  DeviceBuffer<HeadScalars> head_d_;
  DeviceBuffer<uint8_t> rowhit_, vhit_;
  DeviceBuffer<int> flag_;
  DeviceBuffer<char> workspace_;
  Graph graph_;
};

template <typename Tin, typename Tc>
GridResult run_typed(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                     const double* wds, const Matrix& X, const int64_t* labels,
                     const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                     const TrainOptions& opt, const GridEpochCallback& on_epoch,
                     const InterruptCheck& interrupted) {
  GridTrainer<Tin, Tc> t(spec, heads, params, lrs, wds, X, labels, subset, val, loss, opt);
  return t.run(on_epoch, interrupted, opt.stream);
}

}  // namespace

GridResult train_heads(const HeadSpec& spec, int64_t heads, float* params, const double* lrs,
                       const double* weight_decays, const Matrix& X, const int64_t* labels,
                       const RowSubset& subset, const ValidationSet& val, const LossSpec& loss,
                       const TrainOptions& opt, const GridEpochCallback& on_epoch,
                       const InterruptCheck& interrupted) {
  DeviceGuard guard(X.device);
  switch (X.dtype) {
    case DType::BF16:
      return run_typed<__nv_bfloat16, __nv_bfloat16>(spec, heads, params, lrs, weight_decays, X,
                                                     labels, subset, val, loss, opt, on_epoch,
                                                     interrupted);
    case DType::F16:
      return run_typed<__half, __half>(spec, heads, params, lrs, weight_decays, X, labels,
                                       subset, val, loss, opt, on_epoch, interrupted);
    case DType::F32:
      return run_typed<float, float>(spec, heads, params, lrs, weight_decays, X, labels, subset,
                                     val, loss, opt, on_epoch, interrupted);
    case DType::F64:
      return run_typed<double, float>(spec, heads, params, lrs, weight_decays, X, labels, subset,
                                      val, loss, opt, on_epoch, interrupted);
  }
  throw std::invalid_argument("features have an unsupported dtype");
}

}  // namespace cuda
}  // namespace pyft
