// Python bindings: the only file that includes pybind11. Converts NumPy arrays into the plain
// C++ views of csrc/ (no copies of features), releases the GIL for long calls, and routes
// per-epoch callbacks and Ctrl-C back into Python.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/blas.h"
#include "common/check.h"
#include "common/convert.h"
#include "common/device.h"
#include "common/dlpack.h"
#include "common/head_checks.h"
#include "common/head_math.h"
#include "common/optim.h"
#include "common/parallel.h"
#include "common/rng.h"
#include "gather/gather.h"
#include "head_grid/head_grid.h"
#include "head_lbfgs/head_lbfgs.h"
#include "head_predict/head_predict.h"
#include "head_train/head_train.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace pyft {
namespace {

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

/// The element type of a feature array. bfloat16 arrives either as an ml_dtypes.bfloat16 array or
/// as a 16-bit integer array with bfloat16=True (the bit pattern, e.g.
/// torch_tensor.view(torch.int16).numpy()).
DType feature_dtype(const py::array& a, const char* name, bool bfloat16) {
  const std::string dt = dtype_str(a);
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  if (bfloat16) {
    PYFT_CHECK(size == 2 && (kind == 'u' || kind == 'i' || dt == "bfloat16"),
               "%s with bfloat16=True must hold 16-bit bfloat16 bit patterns (uint16, int16 or "
               "ml_dtypes.bfloat16); got %s",
               name, dt.c_str());
    return DType::BF16;
  }
  if (dt == "bfloat16") return DType::BF16;
  if (kind == 'f' && size == 4) return DType::F32;
  if (kind == 'f' && size == 2) return DType::F16;
  if (kind == 'f' && size == 8) return DType::F64;
  PYFT_CHECK(false, "%s must be float32, float16, bfloat16 or float64; got %s", name, dt.c_str());
  return DType::F32;
}

/// A 2-D feature view over any float32/float16/bfloat16/float64 array, any strides, no copy.
Matrix to_matrix(const py::array& a, const char* name, bool bfloat16) {
  PYFT_CHECK(a.ndim() == 2, "%s must be a 2-D array (n_samples, n_features); got %d dimension(s)",
             name, (int)a.ndim());
  Matrix m;
  m.dtype = feature_dtype(a, name, bfloat16);
  m.data = a.data();
  m.rows = a.shape(0);
  m.cols = a.shape(1);
  m.row_stride = a.strides(0);
  m.col_stride = a.strides(1);
  return m;
}

// ---------------------------------------------------------------------------------------------
// CUDA arrays arrive through DLPack (a torch CUDA tensor, CuPy array or a "dltensor" capsule).

/// A device tensor borrowed for the duration of a call. The capsule is never consumed (renamed to
/// "used_dltensor"): holding it keeps the producer's memory alive, and its own destructor calls
/// the deleter once the call is over.
struct DLView {
  py::object capsule;
  const dlpack::Tensor* t = nullptr;
  int device = kHost;
  void* data() const { return static_cast<char*>(t->data) + t->byte_offset; }
  int64_t shape(int d) const { return t->shape[d]; }
  /// Stride of dimension d in elements (DLPack's null strides mean C-contiguous).
  int64_t stride(int d) const {
    if (t->strides) return t->strides[d];
    int64_t s = 1;
    for (int k = t->ndim - 1; k > d; --k) s *= t->shape[k];
    return s;
  }
  std::string describe() const {
    std::string s = "(";
    for (int d = 0; d < t->ndim; ++d) s += (d ? ", " : "") + std::to_string(t->shape[d]);
    return s + (t->ndim == 1 ? ",)" : ")");
  }
};

std::string type_name(py::handle obj) {
  return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

/// The DLPack view of `obj` when it lives on a CUDA device (exported for the consumer stream
/// `stream`, so the producer orders its pending work before ours); nullopt for anything else,
/// which then takes the NumPy path.
std::optional<DLView> cuda_tensor(py::handle obj, const char* name, StreamHandle stream) {
  if (obj.is_none() || py::isinstance<py::array>(obj)) return std::nullopt;
  py::object cap;
  if (PyCapsule_CheckExact(obj.ptr())) {
    cap = py::reinterpret_borrow<py::object>(obj);
  } else if (py::hasattr(obj, "__dlpack_device__") && py::hasattr(obj, "__dlpack__")) {
    py::tuple dev = obj.attr("__dlpack_device__")();
    const int type = dev[0].cast<int>();
    if (type == dlpack::kCPU || type == dlpack::kCUDAHost) return std::nullopt;
    PYFT_CHECK(type == dlpack::kCUDA || type == dlpack::kCUDAManaged,
               "%s is on an unsupported device (DLPack device type %d); pyft takes host arrays "
               "or CUDA tensors", name, type);
    // In DLPack's numbering 1 is the legacy default stream; 0 is not allowed for CUDA.
    try {
      cap = obj.attr("__dlpack__")("stream"_a = stream == 0 ? StreamHandle(1) : stream);
    } catch (py::error_already_set& e) {
      // torch refuses tensors that require grad, and tensors on a device other than the current
      // one: name the argument and say what the producer said.
      if (!e.matches(PyExc_BufferError)) throw;
      PYFT_CHECK(false, "%s could not be exported through DLPack: %s (pass a detached tensor, "
                 "with its device current: torch.cuda.device(t.device))", name, e.what());
    }
  } else {
    return std::nullopt;
  }
  PYFT_CHECK(PyCapsule_IsValid(cap.ptr(), "dltensor"),
             "%s must be a DLPack capsule named 'dltensor' that has not been consumed yet", name);
  auto* mt = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  PYFT_CHECK(mt != nullptr, "%s: empty DLPack capsule", name);
  DLView v;
  v.capsule = cap;
  v.t = &mt->dl_tensor;
  const int type = v.t->device.device_type;
  PYFT_CHECK(type == dlpack::kCUDA || type == dlpack::kCUDAManaged,
             "%s: pyft takes DLPack capsules of CUDA tensors only (host arrays as NumPy); got "
             "DLPack device type %d", name, type);
  v.device = v.t->device.device_id;
  PYFT_CHECK(v.t->dtype.lanes == 1, "%s must have scalar elements; got %d lanes", name,
             (int)v.t->dtype.lanes);
  return v;
}

/// The element type of a CUDA feature tensor (bfloat16=True reads 16-bit integers as bf16 bits).
DType cuda_feature_dtype(const DLView& v, const char* name, bool bfloat16) {
  const auto code = v.t->dtype.code;
  const auto bits = v.t->dtype.bits;
  if (bfloat16 && bits == 16 && (code == dlpack::kInt || code == dlpack::kUInt || code == dlpack::kBfloat))
    return DType::BF16;
  if (code == dlpack::kBfloat && bits == 16) return DType::BF16;
  if (code == dlpack::kFloat && bits == 32) return DType::F32;
  if (code == dlpack::kFloat && bits == 16) return DType::F16;
  if (code == dlpack::kFloat && bits == 64) return DType::F64;
  PYFT_CHECK(false, "%s must be float32, float16, bfloat16 or float64; got a CUDA tensor with "
             "DLPack type code %d, %d bits", name, (int)code, (int)bits);
  return DType::F32;
}

/// A 2-D feature view over a CUDA tensor (strides in bytes, as Matrix wants).
Matrix cuda_matrix(const DLView& v, const char* name, bool bfloat16) {
  PYFT_CHECK(v.t->ndim == 2,
             "%s must be a 2-D tensor (n_samples, n_features); got %d dimension(s)", name,
             (int)v.t->ndim);
  Matrix m;
  m.dtype = cuda_feature_dtype(v, name, bfloat16);
  const int64_t item = dtype_size(m.dtype);
  m.data = v.data();
  m.rows = v.shape(0);
  m.cols = v.shape(1);
  m.row_stride = v.stride(0) * item;
  m.col_stride = v.stride(1) * item;
  m.device = v.device;
  return m;
}

/// A 1-D int64 CUDA tensor with unit stride (indices, labels).
const int64_t* cuda_int64_vector(const DLView& v, const char* name, int64_t* n) {
  PYFT_CHECK(v.t->ndim == 1 && v.t->dtype.code == dlpack::kInt && v.t->dtype.bits == 64,
             "%s on a CUDA device must be a 1-D int64 tensor; got %d-D with DLPack type code %d, "
             "%d bits", name, (int)v.t->ndim, (int)v.t->dtype.code, (int)v.t->dtype.bits);
  PYFT_CHECK(v.shape(0) <= 1 || v.stride(0) == 1,
             "%s on a CUDA device must be contiguous; got stride %lld", name,
             (long long)v.stride(0));
  *n = v.shape(0);
  return static_cast<const int64_t*>(v.data());
}

/// Host-side checks that a device mix is deliberate: every CUDA argument on `device`.
std::string place_str(int device) {
  return device == kHost ? std::string("host memory") : "cuda:" + std::to_string(device);
}

/// Arguments of one call must live together: `name` where `ref` is (device or kHost).
void check_same_device(const std::optional<DLView>& v, int device, const char* name,
                       const char* ref) {
  const int got = v ? v->device : kHost;
  PYFT_CHECK(got == device, "%s must be in the same place as %s (%s); got %s", name, ref,
             place_str(device).c_str(), place_str(got).c_str());
}

/// A host argument must already be a NumPy array (as the py::array parameters these replace
/// required): no silent conversion of lists or other objects.
py::array as_host_array(py::handle obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(format("%s must be a NumPy array (or, in CUDA builds, a CUDA tensor); "
                                "got %s", name, type_name(obj).c_str()));
  return py::reinterpret_borrow<py::array>(obj);
}

/// Labels as a contiguous int64 vector (labels are small; copying them is fine).
py::array_t<int64_t> to_labels(const py::array& a, const char* name, int64_t n,
                               int64_t classes) {
  PYFT_CHECK(a.ndim() == 1, "%s must be a 1-D array; got %d dimension(s)", name, (int)a.ndim());
  const char kind = a.dtype().kind();
  PYFT_CHECK(kind == 'i' || kind == 'u', "%s must be an integer array of class indices; got %s",
             name, dtype_str(a).c_str());
  PYFT_CHECK(a.shape(0) == n, "%s must have one entry per feature row (%lld); got %lld", name,
             (long long)n, (long long)a.shape(0));
  if (kind == 'u' && a.itemsize() == 8) {
    // uint64 values >= 2**63 would wrap to negative int64: report them as given.
    auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    const uint64_t* d = u.data();
    for (int64_t i = 0; i < u.shape(0); ++i)
      PYFT_CHECK(d[i] < static_cast<uint64_t>(classes), "%s must be in [0, %lld); got %llu at index %lld",
                 name, (long long)classes, (unsigned long long)d[i], (long long)i);
  }
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

float* params_ptr(const py::array& p, int64_t expected, bool writeable = true,
                  const char* name = "params") {
  PYFT_CHECK(p.ndim() == 1 && p.dtype().kind() == 'f' && p.itemsize() == 4,
             "%s must be a 1-D float32 array; got %d-D %s", name, (int)p.ndim(),
             dtype_str(p).c_str());
  PYFT_CHECK(p.shape(0) == expected, "%s must have %lld entries for this head; got %lld", name,
             (long long)expected, (long long)p.shape(0));
  PYFT_CHECK(p.flags() & py::array::c_style, "%s must be C-contiguous; got stride %lld bytes",
             name, (long long)p.strides(0));
  PYFT_CHECK(!writeable || p.writeable(),
             "%s must be writeable (they are updated in place); got a read-only array", name);
  return static_cast<float*>(const_cast<void*>(p.data()));
}

HeadSpec make_spec(const std::string& head, int64_t in_features, int64_t hidden, int64_t classes,
                   const std::string& activation) {
  HeadSpec s;
  if (head == "linear") {
    s.kind = HeadKind::Linear;
  } else if (head == "mlp") {
    s.kind = HeadKind::MLP;
  } else {
    PYFT_CHECK(false, "head must be 'linear' or 'mlp'; got '%s'", head.c_str());
  }
  if (activation == "relu") {
    s.activation = Activation::ReLU;
  } else if (activation == "gelu") {
    s.activation = Activation::GELU;
  } else {
    PYFT_CHECK(false, "activation must be 'relu' or 'gelu'; got '%s'", activation.c_str());
  }
  s.in_features = in_features;
  s.hidden = s.kind == HeadKind::MLP ? hidden : 0;
  s.classes = classes;
  check_spec(s);
  return s;
}

KernelChoice make_kernel(const std::string& k) {
  if (k == "auto") return KernelChoice::Auto;
  if (k == "blas") return KernelChoice::Blas;
  if (k == "fused") return KernelChoice::Fused;
  PYFT_CHECK(false, "kernel must be 'auto', 'blas' or 'fused'; got '%s'", k.c_str());
  return KernelChoice::Auto;
}

struct WeightsHolder {
  py::array_t<float> arr;
  LossSpec spec;
};

WeightsHolder make_loss(const std::optional<py::array>& class_weights, double label_smoothing,
                        int64_t classes) {
  WeightsHolder h;
  h.spec.label_smoothing = static_cast<float>(label_smoothing);
  if (class_weights) {
    const py::array& w = *class_weights;
    PYFT_CHECK(w.ndim() == 1 && w.shape(0) == classes,
               "class_weights must be a 1-D array of %lld weights; got shape with %d dims and %lld "
               "entries",
               (long long)classes, (int)w.ndim(), (long long)(w.ndim() ? w.shape(0) : 0));
    PYFT_CHECK(w.dtype().kind() == 'f' || w.dtype().kind() == 'i' || w.dtype().kind() == 'u',
               "class_weights must be numeric; got %s", dtype_str(w).c_str());
    h.arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(w);
    h.spec.class_weights = h.arr.data();
  }
  return h;
}

/// Carries a Python exception raised inside a callback (or Ctrl-C) across the native loop.
struct PyErrorSlot {
  std::unique_ptr<py::error_already_set> error;
  void rethrow() {
    if (error) {
      auto e = std::move(error);
      throw py::error_already_set(std::move(*e));
    }
  }
};

InterruptCheck make_interrupt_check(PyErrorSlot& slot) {
  return [&slot]() -> bool {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      slot.error = std::make_unique<py::error_already_set>();
      return true;
    }
    return false;
  };
}

py::dict epoch_dict(const EpochStats& st) {
  py::dict d("epoch"_a = st.epoch, "train_loss"_a = st.train_loss,
             "train_accuracy"_a = st.train_accuracy, "lr"_a = st.lr, "steps"_a = st.steps,
             "seconds"_a = st.seconds);
  if (st.has_val) {
    d["val_loss"] = st.val_loss;
    d["val_accuracy"] = st.val_accuracy;
  }
  return d;
}

/// Row indices (train_rows, val_rows) as a contiguous int64 vector; the range is checked in csrc.
py::array_t<int64_t> to_rows(const py::array& a, const char* name) {
  PYFT_CHECK(a.ndim() == 1 && (a.dtype().kind() == 'i' || a.dtype().kind() == 'u'),
             "%s must be a 1-D integer array of row indices; got %d-D %s", name, (int)a.ndim(),
             dtype_str(a).c_str());
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

void set_schedule(TrainOptions& opt, const std::string& schedule) {
  if (schedule == "constant") {
    opt.schedule = ScheduleKind::Constant;
  } else if (schedule == "cosine") {
    opt.schedule = ScheduleKind::Cosine;
  } else if (schedule == "step") {
    opt.schedule = ScheduleKind::Step;
  } else {
    PYFT_CHECK(false, "schedule must be 'constant', 'cosine' or 'step'; got '%s'", schedule.c_str());
  }
}

void set_optimizer_and_schedule(TrainOptions& opt, const std::string& optimizer,
                                const std::string& schedule) {
  if (optimizer == "sgd") {
    opt.optimizer = OptimizerKind::SGD;
  } else if (optimizer == "adamw") {
    opt.optimizer = OptimizerKind::AdamW;
  } else {
    PYFT_CHECK(false, "optimizer must be 'sgd' or 'adamw'; got '%s'", optimizer.c_str());
  }
  set_schedule(opt, schedule);
}

/// One optimizer step of train_head's update (weight decay on the weight matrices only) with
/// caller-held state: m (SGD momentum buffer or AdamW first moment), v (AdamW second moment).
void optimizer_step_py(py::array params, py::array grad, py::array m, std::optional<py::array> v,
                       int64_t step, const std::string& head, int64_t in_features,
                       int64_t num_classes, int64_t hidden_size, const std::string& optimizer,
                       double lr, double weight_decay, double momentum, double dampening,
                       bool nesterov, double beta1, double beta2, double eps) {
  HeadSpec spec = make_spec(head, in_features, hidden_size, num_classes, "relu");
  TrainOptions opt;
  set_optimizer_and_schedule(opt, optimizer, "constant");
  PYFT_CHECK(step >= 1, "step must be >= 1 (the count of steps so far, this one included); got %lld",
             (long long)step);
  const int64_t P = spec.num_params();
  float* p = params_ptr(params, P);
  const float* g = params_ptr(grad, P, /*writeable=*/false, "grad");
  float* mb = params_ptr(m, P, true, "m");
  const bool adamw = opt.optimizer == OptimizerKind::AdamW;
  PYFT_CHECK(!adamw || v.has_value(), "optimizer='adamw' needs the second-moment buffer v");
  float* vb = adamw ? params_ptr(*v, P, true, "v") : nullptr;
  py::gil_scoped_release release;
  auto update = [&](int64_t a, int64_t b, float wd) {
    if (adamw) {
      const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
      const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
      adamw_update(p + a, g + a, mb + a, vb + a, b - a, static_cast<float>(lr), wd,
                   static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                   static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                   static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)));
    } else {
      sgd_update(p + a, g + a, momentum != 0.0 ? mb + a : nullptr, b - a, static_cast<float>(lr),
                 wd, static_cast<float>(momentum), static_cast<float>(dampening), nesterov,
                 step == 1);
    }
  };
  for (auto& r : spec.weight_ranges()) update(r.first, r.second, static_cast<float>(weight_decay));
  for (auto& r : spec.bias_ranges()) update(r.first, r.second, 0.0f);
}

/// Labels from a host array or a CUDA int64 tensor (copied to the host: they are validated
/// there, and the trainers keep a host copy for batch normalisers).
py::array_t<int64_t> labels_from(py::handle obj, const char* name, int64_t n, int64_t classes,
                                 StreamHandle stream) {
  if (const std::optional<DLView> v = cuda_tensor(obj, name, stream)) {
    int64_t count = 0;
    const int64_t* p = cuda_int64_vector(*v, name, &count);
    PYFT_CHECK(count == n, "%s must have one entry per feature row (%lld); got %lld", name,
               (long long)n, (long long)count);
    py::array_t<int64_t> host(count);
    int64_t* h = host.mutable_data();
    py::gil_scoped_release release;
    cuda_copy_to_host(h, p, count * 8, v->device, stream);
    return host;
  }
  return to_labels(as_host_array(obj, name), name, n, classes);
}

/// Features as a Matrix over a host array (kept alive in `hold`) or a CUDA tensor (`dl`).
Matrix features_from(py::handle obj, const char* name, bool bfloat16, StreamHandle stream,
                     py::array* hold, std::optional<DLView>* dl) {
  *dl = cuda_tensor(obj, name, stream);
  if (*dl) return cuda_matrix(**dl, name, bfloat16);
  *hold = as_host_array(obj, name);
  return to_matrix(*hold, name, bfloat16);
}

py::dict train_head_py(py::array params, py::object features, py::object labels,
                       const std::string& head, int64_t num_classes, int64_t hidden_size,
                       const std::string& activation, std::optional<py::array> train_rows,
                       py::object val_features, py::object val_labels, bool bfloat16,
                       std::optional<py::array> class_weights, double label_smoothing,
                       const std::string& optimizer, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, double beta1,
                       double beta2, double eps, const std::string& schedule,
                       int64_t warmup_steps, double min_lr_ratio, int64_t step_size, double gamma,
                       int64_t epochs, int64_t batch_size, bool shuffle, bool drop_last,
                       uint64_t seed, double dropout, int64_t patience, double min_delta,
                       int n_threads, const std::string& kernel, std::optional<py::function> callback,
                       StreamHandle stream, bool cuda_graphs) {
  py::array X_hold, Xv_hold;
  std::optional<DLView> X_dl, Xv_dl;
  Matrix X = features_from(features, "features", bfloat16, stream, &X_hold, &X_dl);
  HeadSpec spec = make_spec(head, X.cols, hidden_size, num_classes, activation);
  float* p = params_ptr(params, spec.num_params());
  auto y = labels_from(labels, "labels", X.rows, num_classes, stream);
  RowSubset subset;
  py::array_t<int64_t> rows_arr;
  if (train_rows) {
    rows_arr = to_rows(*train_rows, "train_rows");
    subset.rows = rows_arr.data();
    subset.count = rows_arr.shape(0);
  }
  std::optional<Matrix> Xv;
  py::array_t<int64_t> yv;
  PYFT_CHECK(val_features.is_none() == val_labels.is_none(),
             "val_features and val_labels must be given together");
  if (!val_features.is_none()) {
    Xv = features_from(val_features, "val_features", bfloat16, stream, &Xv_hold, &Xv_dl);
    yv = labels_from(val_labels, "val_labels", Xv->rows, num_classes, stream);
  }
  WeightsHolder loss = make_loss(class_weights, label_smoothing, num_classes);

  TrainOptions opt;
  set_optimizer_and_schedule(opt, optimizer, schedule);
  opt.stream = stream;
  opt.cuda_graphs = cuda_graphs;
  opt.lr = lr;
  opt.weight_decay = weight_decay;
  opt.momentum = momentum;
  opt.dampening = dampening;
  opt.nesterov = nesterov;
  opt.beta1 = beta1;
  opt.beta2 = beta2;
  opt.eps = eps;
  opt.warmup_steps = warmup_steps;
  opt.min_lr_ratio = min_lr_ratio;
  opt.step_size = step_size;
  opt.gamma = gamma;
  opt.epochs = epochs;
  opt.batch_size = batch_size;
  opt.shuffle = shuffle;
  opt.drop_last = drop_last;
  opt.seed = seed;
  opt.dropout = static_cast<float>(dropout);
  opt.patience = patience;
  opt.min_delta = min_delta;
  opt.n_threads = n_threads;
  opt.kernel = make_kernel(kernel);

  PyErrorSlot slot;
  std::vector<EpochStats> history;
  EpochCallback on_epoch = [&](const EpochStats& st) -> bool {
    history.push_back(st);
    if (!callback) return true;
    py::gil_scoped_acquire gil;
    try {
      py::object r = (*callback)(epoch_dict(st));
      return r.is_none() || py::bool_(r);
    } catch (py::error_already_set& e) {
      slot.error = std::make_unique<py::error_already_set>(std::move(e));
      return false;
    }
  };
  InterruptCheck interrupted = make_interrupt_check(slot);
  TrainResult res;
  {
    py::gil_scoped_release release;
    res = train_head(spec, p, X, y.data(), subset, Xv ? &*Xv : nullptr, Xv ? yv.data() : nullptr,
                     loss.spec, opt, on_epoch, interrupted);
  }
  slot.rethrow();
  py::list hist;
  for (auto& st : history) hist.append(epoch_dict(st));
  return py::dict("epochs_run"_a = res.epochs_run, "steps"_a = res.steps,
                  "best_epoch"_a = res.best_epoch, "stopped_early"_a = res.stopped_early,
                  "stopped_by_callback"_a = res.stopped_by_callback, "history"_a = hist,
                  "threads"_a = resolve_threads(n_threads),
                  "kernel"_a = X.device != kHost ? "cuda"
                               : use_fused_kernel(spec, opt.kernel) ? "fused" : "blas");
}

/// A 1-D float64 vector of one value per head (lrs, weight_decays; lists are converted).
py::array_t<double> to_per_head(const py::array_t<double>& a, const char* name, int64_t heads) {
  PYFT_CHECK(a.ndim() == 1, "%s must be a 1-D array with one value per head; got %d dimension(s)",
             name, (int)a.ndim());
  PYFT_CHECK(a.shape(0) == heads, "%s must have one value per head (params has %lld rows); got %lld",
             name, (long long)heads, (long long)a.shape(0));
  return a;
}

py::dict grid_epoch_dict(const GridEpochStats& st, const py::array_t<double>& lrs) {
  auto vec = [](const std::vector<double>& v) {
    py::array_t<double> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  std::vector<double> lr(lrs.shape(0));
  for (size_t h = 0; h < lr.size(); ++h) lr[h] = lrs.data()[h] * st.lr_factor;
  py::dict d("epoch"_a = st.epoch, "train_loss"_a = vec(st.train_loss),
             "train_accuracy"_a = vec(st.train_accuracy), "lr"_a = vec(lr), "steps"_a = st.steps,
             "seconds"_a = st.seconds);
  if (st.has_val) {
    d["val_loss"] = vec(st.val_loss);
    d["val_accuracy"] = vec(st.val_accuracy);
  }
  return d;
}

py::dict train_heads_py(py::array params, py::object features, py::object labels,
                        int64_t num_classes, py::array_t<double, py::array::c_style | py::array::forcecast> lrs,
                        py::array_t<double, py::array::c_style | py::array::forcecast> weight_decays,
                        std::optional<py::array> train_rows, py::object val_features,
                        py::object val_labels, std::optional<py::array> val_rows,
                        bool bfloat16, std::optional<py::array> class_weights,
                        double label_smoothing, const std::string& optimizer, double momentum,
                        double dampening, bool nesterov, double beta1, double beta2, double eps,
                        const std::string& schedule, int64_t warmup_steps, double min_lr_ratio,
                        int64_t step_size, double gamma, int64_t epochs, int64_t batch_size,
                        bool shuffle, bool drop_last, uint64_t seed, int n_threads,
                        std::optional<py::function> callback, StreamHandle stream,
                        bool cuda_graphs) {
  py::array X_hold, Xv_hold;
  std::optional<DLView> X_dl, Xv_dl;
  Matrix X = features_from(features, "features", bfloat16, stream, &X_hold, &X_dl);
  HeadSpec spec = make_spec("linear", X.cols, 0, num_classes, "relu");
  const int64_t P = spec.num_params();
  PYFT_CHECK(params.ndim() == 2 && params.dtype().kind() == 'f' && params.itemsize() == 4,
             "params must be a 2-D float32 array (heads, num_classes * n_features + num_classes); "
             "got %d-D %s", (int)params.ndim(), dtype_str(params).c_str());
  PYFT_CHECK(params.shape(1) == P,
             "params must have %lld columns (num_classes * n_features + num_classes); got %lld",
             (long long)P, (long long)params.shape(1));
  PYFT_CHECK(params.flags() & py::array::c_style, "params must be C-contiguous");
  PYFT_CHECK(params.writeable(),
             "params must be writeable (they are updated in place); got a read-only array");
  const int64_t heads = params.shape(0);
  PYFT_CHECK(heads >= 1, "params must hold at least 1 head (one row per head); got 0 rows");
  float* p = static_cast<float*>(params.mutable_data());
  auto lr_arr = to_per_head(lrs, "lrs", heads);
  auto wd_arr = to_per_head(weight_decays, "weight_decays", heads);
  auto y = labels_from(labels, "labels", X.rows, num_classes, stream);
  RowSubset subset;
  py::array_t<int64_t> rows_arr, vrows_arr;
  if (train_rows) {
    rows_arr = to_rows(*train_rows, "train_rows");
    subset.rows = rows_arr.data();
    subset.count = rows_arr.shape(0);
  }
  PYFT_CHECK(val_features.is_none() == val_labels.is_none(),
             "val_features and val_labels must be given together");
  PYFT_CHECK(val_features.is_none() || !val_rows,
             "give either val_features/val_labels or val_rows (rows of features), not both");
  std::optional<Matrix> Xv;
  py::array_t<int64_t> yv;
  ValidationSet val;
  if (!val_features.is_none()) {
    Xv = features_from(val_features, "val_features", bfloat16, stream, &Xv_hold, &Xv_dl);
    yv = labels_from(val_labels, "val_labels", Xv->rows, num_classes, stream);
    val.X = &*Xv;
    val.labels = yv.data();
    val.count = Xv->rows;
  } else if (val_rows) {
    vrows_arr = to_rows(*val_rows, "val_rows");
    val.rows = vrows_arr.data();
    val.count = vrows_arr.shape(0);
    PYFT_CHECK(val.count >= 1, "val_rows must select at least 1 row; got 0");
  }
  WeightsHolder loss = make_loss(class_weights, label_smoothing, num_classes);

  TrainOptions opt;
  set_optimizer_and_schedule(opt, optimizer, schedule);
  opt.momentum = momentum;
  opt.dampening = dampening;
  opt.nesterov = nesterov;
  opt.beta1 = beta1;
  opt.beta2 = beta2;
  opt.eps = eps;
  opt.warmup_steps = warmup_steps;
  opt.min_lr_ratio = min_lr_ratio;
  opt.step_size = step_size;
  opt.gamma = gamma;
  opt.epochs = epochs;
  opt.batch_size = batch_size;
  opt.shuffle = shuffle;
  opt.drop_last = drop_last;
  opt.seed = seed;
  opt.n_threads = n_threads;
  opt.stream = stream;
  opt.cuda_graphs = cuda_graphs;

  PyErrorSlot slot;
  std::vector<GridEpochStats> history;
  GridEpochCallback on_epoch = [&](const GridEpochStats& st) -> bool {
    history.push_back(st);
    if (!callback) return true;
    py::gil_scoped_acquire gil;
    try {
      py::object r = (*callback)(grid_epoch_dict(st, lr_arr));
      return r.is_none() || py::bool_(r);
    } catch (py::error_already_set& e) {
      slot.error = std::make_unique<py::error_already_set>(std::move(e));
      return false;
    }
  };
  InterruptCheck interrupted = make_interrupt_check(slot);
  GridResult res;
  {
    py::gil_scoped_release release;
    res = train_heads(spec, heads, p, lr_arr.data(), wd_arr.data(), X, y.data(), subset, val,
                      loss.spec, opt, on_epoch, interrupted);
  }
  slot.rethrow();
  py::list hist;
  for (auto& st : history) hist.append(grid_epoch_dict(st, lr_arr));
  return py::dict("epochs_run"_a = res.epochs_run, "steps"_a = res.steps,
                  "stopped_by_callback"_a = res.stopped_by_callback, "history"_a = hist,
                  "threads"_a = resolve_threads(n_threads));
}

py::dict train_head_lbfgs_py(py::array params, py::array features, py::array labels,
                             int64_t num_classes, bool bfloat16,
                             std::optional<py::array> class_weights, double label_smoothing,
                             double l2, int64_t max_iter, double tol, double ftol, int64_t history,
                             int n_threads, const std::string& kernel,
                             std::optional<py::function> callback) {
  Matrix X = to_matrix(features, "features", bfloat16);
  HeadSpec spec = make_spec("linear", X.cols, 0, num_classes, "relu");
  float* p = params_ptr(params, spec.num_params());
  auto y = to_labels(labels, "labels", X.rows, num_classes);
  WeightsHolder loss = make_loss(class_weights, label_smoothing, num_classes);
  LbfgsOptions opt;
  opt.l2 = l2;
  opt.max_iter = max_iter;
  opt.tol = tol;
  opt.ftol = ftol;
  opt.history = history;
  opt.n_threads = n_threads;
  opt.kernel = make_kernel(kernel);
  PyErrorSlot slot;
  LbfgsCallback on_iter = [&](const LbfgsIteration& it) -> bool {
    if (!callback) return true;
    py::gil_scoped_acquire gil;
    try {
      py::object r = (*callback)(py::dict("iteration"_a = it.iteration, "objective"_a = it.objective,
                                          "grad_max"_a = it.grad_max,
                                          "evaluations"_a = it.evaluations));
      return r.is_none() || py::bool_(r);
    } catch (py::error_already_set& e) {
      slot.error = std::make_unique<py::error_already_set>(std::move(e));
      return false;
    }
  };
  InterruptCheck interrupted = make_interrupt_check(slot);
  LbfgsResult res;
  {
    py::gil_scoped_release release;
    res = train_head_lbfgs(spec, p, X, y.data(), loss.spec, opt, on_iter, interrupted);
  }
  slot.rethrow();
  return py::dict("iterations"_a = res.iterations, "evaluations"_a = res.evaluations,
                  "objective"_a = res.objective, "grad_max"_a = res.grad_max,
                  "converged"_a = res.converged, "message"_a = res.message);
}

py::tuple objective_py(py::array params, py::array features, py::array labels,
                       const std::string& head, int64_t num_classes, int64_t hidden_size,
                       const std::string& activation, bool bfloat16,
                       std::optional<py::array> class_weights, double label_smoothing, double l2,
                       int n_threads, const std::string& kernel) {
  Matrix X = to_matrix(features, "features", bfloat16);
  HeadSpec spec = make_spec(head, X.cols, hidden_size, num_classes, activation);
  const float* p = params_ptr(params, spec.num_params(), /*writeable=*/false);
  auto y = to_labels(labels, "labels", X.rows, num_classes);
  WeightsHolder loss = make_loss(class_weights, label_smoothing, num_classes);
  KernelChoice kc = make_kernel(kernel);
  py::array_t<float> grad(spec.num_params());
  float* g = grad.mutable_data();
  double f;
  {
    py::gil_scoped_release release;
    f = head_objective(spec, p, X, y.data(), loss.spec, l2, g, n_threads, kc);
  }
  return py::make_tuple(f, grad);
}

py::array predict_py(py::array params, py::array features, const std::string& head,
                     int64_t num_classes, int64_t hidden_size, const std::string& activation,
                     bool bfloat16, const std::string& output, int n_threads) {
  Matrix X = to_matrix(features, "features", bfloat16);
  HeadSpec spec = make_spec(head, X.cols, hidden_size, num_classes, activation);
  const float* p = params_ptr(params, spec.num_params(), /*writeable=*/false);
  PredictOutput what;
  if (output == "logits") {
    what = PredictOutput::Logits;
  } else if (output == "proba") {
    what = PredictOutput::Proba;
  } else if (output == "labels") {
    what = PredictOutput::Labels;
  } else {
    PYFT_CHECK(false, "output must be 'logits', 'proba' or 'labels'; got '%s'", output.c_str());
  }
  if (what == PredictOutput::Labels) {
    py::array_t<int64_t> out(X.rows);
    int64_t* o = out.mutable_data();
    py::gil_scoped_release release;
    head_predict(spec, p, X, what, nullptr, o, n_threads);
    return out;
  }
  py::array_t<float> out({X.rows, num_classes});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    head_predict(spec, p, X, what, o, nullptr, n_threads);
  }
  return out;
}

std::string shape_str(const std::vector<py::ssize_t>& v) {
  std::string s = "(";
  for (size_t d = 0; d < v.size(); ++d) s += (d ? ", " : "") + std::to_string(v[d]);
  return s + (v.size() == 1 ? ",)" : ")");
}

/// Row indices as C-contiguous int64: no copy for int64 input, else a copy (indices are small).
py::array_t<int64_t> to_indices(const py::array& a, int64_t n_rows) {
  PYFT_CHECK(a.ndim() == 1, "indices must be a 1-D array of row indices; got %d dimension(s)",
             (int)a.ndim());
  const char kind = a.dtype().kind();
  PYFT_CHECK(kind == 'i' || kind == 'u',
             "indices must be an integer array (int64 or int32) of row indices; got %s",
             dtype_str(a).c_str());
  if (kind == 'u' && a.itemsize() == 8) {
    // uint64 values >= 2**63 would wrap to negative int64: report them as given.
    auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    const uint64_t* d = u.data();
    for (int64_t r = 0; r < u.shape(0); ++r)
      PYFT_CHECK(d[r] < static_cast<uint64_t>(n_rows),
                 "indices must be in [0, %lld) (rows of src); got %llu at position %lld",
                 (long long)n_rows, (unsigned long long)d[r], (long long)r);
  }
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

/// gather_rows for a CUDA src: indices on the host or the same device, out a CUDA float32 tensor.
py::object gather_rows_cuda(const DLView& sv, py::handle indices, py::handle out, bool bfloat16,
                            StreamHandle stream) {
  const DType dtype = cuda_feature_dtype(sv, "src", bfloat16);
  const int ndim = sv.t->ndim;
  const int64_t item = dtype_size(dtype);
  std::vector<int64_t> shape(ndim), strides(ndim);
  for (int d = 0; d < ndim; ++d) {
    shape[d] = sv.shape(d);
    strides[d] = sv.stride(d) * item;
  }
  Matrix m = gather_source(sv.data(), dtype, ndim, shape.data(), strides.data(), "src");
  m.device = sv.device;
  GatherPlacement place;
  place.stream = stream;
  const int64_t* idx_ptr = nullptr;
  int64_t count = 0;
  py::array_t<int64_t> host_idx;
  const std::optional<DLView> iv = cuda_tensor(indices, "indices", stream);
  if (iv) {
    idx_ptr = cuda_int64_vector(*iv, "indices", &count);
    place.indices_device = iv->device;
  } else {
    host_idx = to_indices(as_host_array(indices, "indices"), m.rows);
    idx_ptr = host_idx.data();
    count = host_idx.shape(0);
  }
  std::vector<int64_t> full{count}, flat{count, m.cols};
  for (int d = 1; d < ndim; ++d) full.push_back(shape[d]);
  PYFT_CHECK(!out.is_none(),
             "out is required when src is a CUDA tensor (the core allocates no device memory for "
             "results): pass torch.empty(%s, dtype=torch.float32, device='cuda:%d')",
             shape_str(std::vector<py::ssize_t>(full.begin(), full.end())).c_str(), sv.device);
  const std::optional<DLView> ov = cuda_tensor(out, "out", stream);
  check_same_device(ov, sv.device, "out", "src");
  PYFT_CHECK(ov->t->dtype.code == dlpack::kFloat && ov->t->dtype.bits == 32,
             "out must be float32; got DLPack type code %d, %d bits", (int)ov->t->dtype.code,
             (int)ov->t->dtype.bits);
  std::vector<int64_t> got(ov->t->shape, ov->t->shape + ov->t->ndim);
  PYFT_CHECK(got == full || got == flat,
             "out must have shape %s (len(indices), *src.shape[1:]); got %s",
             shape_str(std::vector<py::ssize_t>(full.begin(), full.end())).c_str(),
             ov->describe().c_str());
  int64_t expect = 1;
  bool contiguous = true;
  for (int d = ov->t->ndim - 1; d >= 0; --d) {
    if (ov->shape(d) != 1 && ov->stride(d) != expect) contiguous = false;
    expect *= ov->shape(d);
  }
  PYFT_CHECK(contiguous, "out must be C-contiguous (it is filled row by row)");
  place.out_device = ov->device;
  float* o = static_cast<float*>(ov->data());
  {
    py::gil_scoped_release release;
    gather(m, idx_ptr, count, o, m.cols, 0, place);
  }
  return py::reinterpret_borrow<py::object>(out);
}

py::object gather_rows_py(const py::object& src_obj, const py::object& indices,
                          const py::object& out, int n_threads, bool bfloat16,
                          StreamHandle stream) {
  if (const std::optional<DLView> sv = cuda_tensor(src_obj, "src", stream))
    return gather_rows_cuda(*sv, indices, out, bfloat16, stream);
  PYFT_CHECK(!cuda_tensor(indices, "indices", stream) && !cuda_tensor(out, "out", stream),
             "src is in host memory but indices or out are on a CUDA device; the gather runs "
             "where src lives: pass host arrays, or move src to the GPU");
  const py::array src = as_host_array(src_obj, "src");
  const DType dtype = feature_dtype(src, "src", bfloat16);
  const int ndim = static_cast<int>(src.ndim());
  std::vector<int64_t> shape(src.shape(), src.shape() + ndim);
  std::vector<int64_t> strides(src.strides(), src.strides() + ndim);
  const Matrix m = gather_source(src.data(), dtype, ndim, shape.data(), strides.data(), "src");
  const py::array_t<int64_t> idx = to_indices(as_host_array(indices, "indices"), m.rows);
  const int64_t count = idx.shape(0);

  std::vector<py::ssize_t> full{count}, flat{count, m.cols};
  for (int d = 1; d < ndim; ++d) full.push_back(src.shape(d));
  py::array buf;
  if (out.is_none()) {
    buf = py::array_t<float>(full);
  } else {
    PYFT_CHECK(py::isinstance<py::array>(out),
               "out must be a NumPy float32 array or None; got %s",
               py::str(py::type::of(out).attr("__name__")).cast<std::string>().c_str());
    buf = py::reinterpret_borrow<py::array>(out);
    PYFT_CHECK(buf.dtype().kind() == 'f' && buf.itemsize() == 4, "out must be float32; got %s",
               dtype_str(buf).c_str());
    const std::vector<py::ssize_t> got(buf.shape(), buf.shape() + buf.ndim());
    const std::string want = ndim > 2 ? shape_str(full) + " or " + shape_str(flat)
                                      : shape_str(full);
    PYFT_CHECK(got == full || got == flat,
               "out must have shape %s (len(indices), *src.shape[1:]); got %s", want.c_str(),
               shape_str(got).c_str());
    PYFT_CHECK(buf.flags() & py::array::c_style,
               "out must be C-contiguous (it is filled row by row); pass np.empty(%s, "
               "np.float32)",
               shape_str(full).c_str());
    PYFT_CHECK(buf.writeable(), "out must be writeable (it is filled in place); got a read-only "
               "array");
  }
  float* o = static_cast<float*>(buf.mutable_data());
  {
    py::gil_scoped_release release;
    gather(m, idx.data(), count, o, m.cols, n_threads);
  }
  return out.is_none() ? py::object(buf) : out;
}

py::array_t<int64_t> epoch_permutation_py(int64_t n, uint64_t seed, int64_t epoch) {
  PYFT_CHECK(n >= 0, "n must be >= 0; got %lld", (long long)n);
  py::array_t<int64_t> out(n);
  epoch_permutation(seed, epoch, n, out.mutable_data());
  return out;
}

}  // namespace
}  // namespace pyft

PYBIND11_MODULE(_core, m) {
  using namespace pyft;
  m.doc() = "pyft native core: fused head training and inference on NumPy buffers";
  m.attr("__version__") = PYFT_VERSION;

  m.def("train_head", &train_head_py, "params"_a, "features"_a, "labels"_a, py::kw_only(),
        "head"_a = "linear", "num_classes"_a, "hidden_size"_a = 0, "activation"_a = "relu",
        "train_rows"_a = py::none(), "val_features"_a = py::none(), "val_labels"_a = py::none(),
        "bfloat16"_a = false,
        "class_weights"_a = py::none(), "label_smoothing"_a = 0.0, "optimizer"_a = "adamw",
        "lr"_a = 1e-3, "weight_decay"_a = 0.0, "momentum"_a = 0.0, "dampening"_a = 0.0,
        "nesterov"_a = false, "beta1"_a = 0.9, "beta2"_a = 0.999, "eps"_a = 1e-8,
        "schedule"_a = "constant", "warmup_steps"_a = 0, "min_lr_ratio"_a = 0.0,
        "step_size"_a = 1, "gamma"_a = 0.1, "epochs"_a = 10, "batch_size"_a = 256,
        "shuffle"_a = true, "drop_last"_a = false, "seed"_a = 0, "dropout"_a = 0.0,
        "patience"_a = 0, "min_delta"_a = 0.0, "n_threads"_a = 0, "kernel"_a = "auto",
        "callback"_a = py::none(), "stream"_a = 0, "cuda_graphs"_a = true,
        R"doc(Train a head in place with mini-batch SGD or AdamW; one native call, GIL released.

params: 1-D float32 (linear: W (C*D) | b (C); mlp: W1 (H*D) | b1 (H) | W2 (C*H) | b2 (C)),
updated in place. features: 2-D float32/float16/bfloat16/float64, any strides (never copied
whole). labels: integers in [0, num_classes). Returns a dict with the per-epoch history.

CUDA (builds with PYFT_ENABLE_CUDA=ON; linear head): features (and val_features) as CUDA tensors
(__dlpack__ or a DLPack capsule) with contiguous rows, float32/float16/bfloat16/float64; labels
host arrays or int64 tensors; params stay a host array, updated after every epoch. The run is
ordered after `stream` (the caller's cudaStream_t as an int; 0: legacy default stream) and ends
synchronised; cuda_graphs=True replays each epoch as one CUDA graph (with epochs >= 2).)doc");

  m.def("train_heads", &train_heads_py, "params"_a, "features"_a, "labels"_a, py::kw_only(),
        "num_classes"_a, "lrs"_a, "weight_decays"_a, "train_rows"_a = py::none(),
        "val_features"_a = py::none(), "val_labels"_a = py::none(), "val_rows"_a = py::none(),
        "bfloat16"_a = false, "class_weights"_a = py::none(), "label_smoothing"_a = 0.0,
        "optimizer"_a = "sgd", "momentum"_a = 0.0, "dampening"_a = 0.0, "nesterov"_a = false,
        "beta1"_a = 0.9, "beta2"_a = 0.999, "eps"_a = 1e-8, "schedule"_a = "constant",
        "warmup_steps"_a = 0, "min_lr_ratio"_a = 0.0, "step_size"_a = 1, "gamma"_a = 0.1,
        "epochs"_a = 10, "batch_size"_a = 256, "shuffle"_a = true, "drop_last"_a = false,
        "seed"_a = 0, "n_threads"_a = 0, "callback"_a = py::none(), "stream"_a = 0,
        "cuda_graphs"_a = true,
        R"doc(Train H linear heads together in place, each with its own lr and weight decay.

params: 2-D float32 (H, C*D + C), row h = head h's flat layout W (C*D) | b (C), updated in place.
lrs, weight_decays: H values each. Every head sees the same batches (seed), so each batch is
gathered once and multiplied against all heads' weights in one GEMM; head h follows train_head
with lr=lrs[h], weight_decay=weight_decays[h]. Validation on val_features/val_labels or on rows
val_rows of features (no copy). Returns a dict whose history holds per-head arrays per epoch.
CUDA features: as train_head (one GEMM for all heads per batch; at most 65535 heads).)doc");

  m.def("train_head_lbfgs", &train_head_lbfgs_py, "params"_a, "features"_a, "labels"_a,
        py::kw_only(), "num_classes"_a, "bfloat16"_a = false, "class_weights"_a = py::none(),
        "label_smoothing"_a = 0.0, "l2"_a = 0.0, "max_iter"_a = 1000, "tol"_a = 1e-4,
        "ftol"_a = 1e-9, "history"_a = 0, "n_threads"_a = 0, "kernel"_a = "auto",
        "callback"_a = py::none(),
        "Full-batch L-BFGS for the linear head (objective: weighted mean cross-entropy + l2/2 ||W||^2).");

  m.def("objective", &objective_py, "params"_a, "features"_a, "labels"_a, py::kw_only(),
        "head"_a = "linear", "num_classes"_a, "hidden_size"_a = 0, "activation"_a = "relu",
        "bfloat16"_a = false, "class_weights"_a = py::none(), "label_smoothing"_a = 0.0,
        "l2"_a = 0.0, "n_threads"_a = 0, "kernel"_a = "auto",
        "Full-batch objective and its gradient: (value, grad).");

  m.def("predict", &predict_py, "params"_a, "features"_a, py::kw_only(), "head"_a = "linear",
        "num_classes"_a, "hidden_size"_a = 0, "activation"_a = "relu", "bfloat16"_a = false,
        "output"_a = "logits", "n_threads"_a = 0,
        "Logits, softmax probabilities or argmax labels for every row of features.");

  m.def("gather_rows", &gather_rows_py, "src"_a, "indices"_a, "out"_a = py::none(),
        "n_threads"_a = 0, py::kw_only(), "bfloat16"_a = false, "stream"_a = 0,
        R"doc(Gather rows of src by index into float32: out[r] = float32(src[indices[r]]).

src: (n_rows, ...) float32/float16/bfloat16/float64 NumPy array or np.memmap (read-only is
fine; bfloat16 as ml_dtypes.bfloat16 or as its uint16/int16 bit pattern with bfloat16=True).
2-D src may have any strides; with more dimensions each src[i] must be C-contiguous and is
flattened. indices: 1-D integer array, any order, repeats allowed, each in [0, n_rows).
out: None (a new array is returned) or a writeable C-contiguous float32 array of shape
(len(indices), *src.shape[1:]) or (len(indices), prod(src.shape[1:])), filled in place and
returned. Conversion is exact (as ndarray.astype(np.float32)); rows are split over n_threads
(0: all) with the GIL released.

CUDA (builds with PYFT_ENABLE_CUDA=ON): src a CUDA tensor (torch, CuPy: anything with
__dlpack__, or a DLPack capsule), indices a host array or an int64 tensor on the same device,
out a C-contiguous float32 tensor on that device (required). The kernel is queued on `stream`
(a cudaStream_t as an int, e.g. torch.cuda.current_stream().cuda_stream; 0: the legacy default
stream) and the call returns without waiting, except that device-resident indices are checked
first. CPU builds raise RuntimeError for CUDA tensors.)doc");

  m.def("optimizer_step", &optimizer_step_py, "params"_a, "grad"_a, "m"_a, "v"_a = py::none(),
        py::kw_only(), "step"_a, "head"_a = "linear", "in_features"_a, "num_classes"_a,
        "hidden_size"_a = 0, "optimizer"_a = "sgd", "lr"_a, "weight_decay"_a = 0.0,
        "momentum"_a = 0.0, "dampening"_a = 0.0, "nesterov"_a = false, "beta1"_a = 0.9,
        "beta2"_a = 0.999, "eps"_a = 1e-8,
        R"doc(One step of train_head's optimizer on params, in place, from the gradient grad.

The update train_head applies after each batch (same kernels, same order): SGD with momentum /
Nesterov (m: momentum buffer) or AdamW (m, v: moments), weight decay on the weight matrices only.
step counts the steps so far, this one included (1 on the first). For training loops that compute
the gradient elsewhere, e.g. summed over torch.distributed ranks.)doc");

  m.def("epoch_permutation", &epoch_permutation_py, "n"_a, "seed"_a, "epoch"_a,
        "The sample order train_head uses in a given epoch (for reference implementations).");
  m.def("lr_factor",
        [](const std::string& schedule, int64_t step, int64_t total, int64_t steps_per_epoch,
           int64_t warmup_steps, double min_lr_ratio, int64_t step_size, double gamma) {
          PYFT_CHECK(step_size >= 1, "step_size must be >= 1; got %lld", (long long)step_size);
          PYFT_CHECK(std::isfinite(gamma) && gamma > 0.0, "gamma must be > 0; got %g", gamma);
          PYFT_CHECK(min_lr_ratio >= 0.0 && min_lr_ratio <= 1.0,
                     "min_lr_ratio must be in [0, 1]; got %g", min_lr_ratio);
          PYFT_CHECK(warmup_steps >= 0, "warmup_steps must be >= 0; got %lld",
                     (long long)warmup_steps);
          PYFT_CHECK(step >= 0 && total >= 1 && steps_per_epoch >= 1,
                     "step must be >= 0, total and steps_per_epoch >= 1; got %lld, %lld, %lld",
                     (long long)step, (long long)total, (long long)steps_per_epoch);
          TrainOptions o;
          set_schedule(o, schedule);
          o.warmup_steps = warmup_steps;
          o.min_lr_ratio = min_lr_ratio;
          o.step_size = step_size;
          o.gamma = gamma;
          return lr_factor(o, step, total, steps_per_epoch);
        },
        "schedule"_a, "step"_a, "total"_a, "steps_per_epoch"_a, "warmup_steps"_a = 0,
        "min_lr_ratio"_a = 0.0, "step_size"_a = 1, "gamma"_a = 0.1,
        "Learning-rate multiplier of a schedule at an optimizer step.");
  m.def("num_threads", [](int requested) { return resolve_threads(requested); }, "requested"_a = 0,
        "Threads a call with n_threads=requested will use.");
  m.def("blas_config", []() { return std::string(blas_config()); }, "OpenBLAS build configuration.");
  m.def("cuda_version", []() {
#if defined(PYFT_WITH_CUDA)
    return PYFT_CUDA_VERSION;  // the toolkit the kernels were compiled with, e.g. 13000
#else
    return -1;
#endif
  }, "CUDA toolkit version the kernels were built with (e.g. 13000), or -1 for a CPU-only build.");
  m.def("cuda_kernels", []() {
    std::vector<std::string> ops;
    if (built_with_cuda()) ops = {"gather_rows", "train_head", "train_heads"};
    return ops;
  }, R"doc(Ops with a CUDA kernel in this build ([] for a CPU-only build). train_head's CUDA kernel
covers the linear head; train_heads is linear only anyway.)doc");
  m.def("cuda_device_count", []() { return cuda_device_count(); },
        "CUDA devices the driver reports (0 without a driver or GPU, and in CPU-only builds).");
  m.def("has_openmp", []() {
#if defined(PYFT_WITH_OPENMP)
    return true;
#else
    return false;
#endif
  });
}
