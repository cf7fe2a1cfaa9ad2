// Python bindings: builds pyft._core. Converts NumPy arrays and DLPack tensors into the plain
// C++ views of csrc/ (bindings/py_convert: no copies of features), releases the GIL for long
// calls, and routes per-epoch callbacks and Ctrl-C back into Python (bindings/py_train, which
// also holds the training bindings' one keyword table).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "bindings/py_convert.h"
#include "bindings/py_train.h"
#include "common/blas.h"
#include "common/check.h"
#include "common/device.h"
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
namespace bind {
namespace {

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

/// The arrays both trainers take: features (host or CUDA), labels and train_rows.
struct TrainData {
  py::array X_hold, Xv_hold;
  std::optional<DLView> X_dl, Xv_dl;
  Matrix X;
  py::array_t<int64_t> y, rows;
  RowSubset subset;
};

const Matrix& train_features(TrainData& d, const py::object& features, const TrainArgs& a) {
  d.X = features_from(features, "features", a.bfloat16, a.opt.stream, &d.X_hold, &d.X_dl);
  return d.X;
}

void train_labels_and_rows(TrainData& d, const py::object& labels, const TrainArgs& a) {
  d.y = labels_from(labels, "labels", d.X.rows, a.num_classes, a.opt.stream);
  if (a.train_rows) {
    d.rows = to_rows(*a.train_rows, "train_rows");
    d.subset.rows = d.rows.data();
    d.subset.count = d.rows.shape(0);
  }
}

py::dict train_head_py(py::array params, py::object features, py::object labels, TrainArgs& a) {
  TrainData d;
  const Matrix& X = train_features(d, features, a);
  HeadSpec spec = make_spec(a.head, X.cols, a.hidden_size, a.num_classes, a.activation);
  float* p = params_ptr(params, spec.num_params());
  train_labels_and_rows(d, labels, a);
  std::optional<Matrix> Xv;
  py::array_t<int64_t> yv;
  PYFT_CHECK(a.val_features.is_none() == a.val_labels.is_none(),
             "val_features and val_labels must be given together");
  if (!a.val_features.is_none()) {
    Xv = features_from(a.val_features, "val_features", a.bfloat16, a.opt.stream, &d.Xv_hold,
                       &d.Xv_dl);
    yv = labels_from(a.val_labels, "val_labels", Xv->rows, a.num_classes, a.opt.stream);
  }
  WeightsHolder loss = make_loss(a.class_weights, a.label_smoothing, a.num_classes);
  TrainOptions& opt = a.opt;
  set_optimizer_and_schedule(opt, a.optimizer, a.schedule);
  opt.kernel = make_kernel(a.kernel);

  PyErrorSlot slot;
  std::vector<EpochStats> history;
  const EpochCallback on_epoch = python_callback(a.callback, slot, epoch_dict, &history);
  const InterruptCheck interrupted = make_interrupt_check(slot);
  TrainResult res;
  {
    py::gil_scoped_release release;
    res = train_head(spec, p, X, d.y.data(), d.subset, Xv ? &*Xv : nullptr,
                     Xv ? yv.data() : nullptr, loss.spec, opt, on_epoch, interrupted);
  }
  slot.rethrow();
  py::list hist;
  for (auto& st : history) hist.append(epoch_dict(st));
  return py::dict("epochs_run"_a = res.epochs_run, "steps"_a = res.steps,
                  "best_epoch"_a = res.best_epoch, "stopped_early"_a = res.stopped_early,
                  "stopped_by_callback"_a = res.stopped_by_callback, "history"_a = hist,
                  "threads"_a = resolve_threads(opt.n_threads),
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

py::dict train_heads_py(py::array params, py::object features, py::object labels, TrainArgs& a) {
  TrainData d;
  const Matrix& X = train_features(d, features, a);
  HeadSpec spec = make_spec("linear", X.cols, 0, a.num_classes, "relu");
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
  auto lr_arr = to_per_head(a.lrs, "lrs", heads);
  auto wd_arr = to_per_head(a.weight_decays, "weight_decays", heads);
  train_labels_and_rows(d, labels, a);
  PYFT_CHECK(a.val_features.is_none() == a.val_labels.is_none(),
             "val_features and val_labels must be given together");
  PYFT_CHECK(a.val_features.is_none() || !a.val_rows,
             "give either val_features/val_labels or val_rows (rows of features), not both");
  std::optional<Matrix> Xv;
  py::array_t<int64_t> yv, vrows_arr;
  ValidationSet val;
  if (!a.val_features.is_none()) {
    Xv = features_from(a.val_features, "val_features", a.bfloat16, a.opt.stream, &d.Xv_hold,
                       &d.Xv_dl);
    yv = labels_from(a.val_labels, "val_labels", Xv->rows, a.num_classes, a.opt.stream);
    val.X = &*Xv;
    val.labels = yv.data();
    val.count = Xv->rows;
  } else if (a.val_rows) {
    vrows_arr = to_rows(*a.val_rows, "val_rows");
    val.rows = vrows_arr.data();
    val.count = vrows_arr.shape(0);
    PYFT_CHECK(val.count >= 1, "val_rows must select at least 1 row; got 0");
  }
  WeightsHolder loss = make_loss(a.class_weights, a.label_smoothing, a.num_classes);
  TrainOptions& opt = a.opt;
  set_optimizer_and_schedule(opt, a.optimizer, a.schedule);

  PyErrorSlot slot;
  std::vector<GridEpochStats> history;
  auto to_dict = [&lr_arr](const GridEpochStats& st) { return grid_epoch_dict(st, lr_arr); };
  const GridEpochCallback on_epoch = python_callback(a.callback, slot, to_dict, &history);
  const InterruptCheck interrupted = make_interrupt_check(slot);
  GridResult res;
  {
    py::gil_scoped_release release;
    res = train_heads(spec, heads, p, lr_arr.data(), wd_arr.data(), X, d.y.data(), d.subset, val,
                      loss.spec, opt, on_epoch, interrupted);
  }
  slot.rethrow();
  py::list hist;
  for (auto& st : history) hist.append(to_dict(st));
  return py::dict("epochs_run"_a = res.epochs_run, "steps"_a = res.steps,
                  "stopped_by_callback"_a = res.stopped_by_callback, "history"_a = hist,
                  "threads"_a = resolve_threads(opt.n_threads));
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
  auto to_dict = [](const LbfgsIteration& it) {
    return py::dict("iteration"_a = it.iteration, "objective"_a = it.objective,
                    "grad_max"_a = it.grad_max, "evaluations"_a = it.evaluations);
  };
  const LbfgsCallback on_iter = python_callback<LbfgsIteration>(callback, slot, to_dict);
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
}  // namespace bind
}  // namespace pyft

PYBIND11_MODULE(_core, m) {
  using namespace pyft;
  using namespace pyft::bind;
  m.doc() = "pyft native core: fused head training and inference on NumPy buffers";
  m.attr("__version__") = PYFT_VERSION;

  def_trainer(m, "train_head", kw::TrainHead{}, train_head_py,
              R"doc(Train a head in place with mini-batch SGD or AdamW; one native call, GIL released.

params: 1-D float32 (linear: W (C*D) | b (C); mlp: W1 (H*D) | b1 (H) | W2 (C*H) | b2 (C)),
updated in place. features: 2-D float32/float16/bfloat16/float64, any strides (never copied
whole). labels: integers in [0, num_classes). Returns a dict with the per-epoch history.

CUDA (builds with PYFT_ENABLE_CUDA=ON; linear head): features (and val_features) as CUDA tensors
(__dlpack__ or a DLPack capsule) with contiguous rows, float32/float16/bfloat16/float64; labels
host arrays or int64 tensors; params stay a host array, updated after every epoch. The run is
ordered after `stream` (the caller's cudaStream_t as an int; 0: legacy default stream) and ends
synchronised; cuda_graphs=True replays each epoch as one CUDA graph (with epochs >= 2).)doc");

  def_trainer(m, "train_heads", kw::TrainHeads{}, train_heads_py,
              R"doc(Train H linear heads together in place, each with its own lr and weight decay.

params: 2-D float32 (H, C*D + C), row h = head h's flat layout W (C*D) | b (C), updated in place.
lrs, weight_decays: H values each. Every head sees the same batches (seed), so each batch is
gathered once and multiplied against all heads' weights in one GEMM; head h follows train_head
with lr=lrs[h], weight_decay=weight_decays[h]. Validation on val_features/val_labels or on rows
val_rows of features (no copy). Returns a dict whose history holds per-head arrays per epoch.
CUDA features: as train_head (one GEMM for all heads per batch; at most 65535 heads).)doc");

  m.def("train_head_options",
        [](const std::string& function) {
          if (function == "train_head") return describe(kw::TrainHead{});
          PYFT_CHECK(function == "train_heads",
                     "function must be 'train_head' or 'train_heads'; got '%s'", function.c_str());
          return describe(kw::TrainHeads{});
        },
        "function"_a = "train_head",
        R"doc(The keyword options of train_head (or train_heads) in signature order, as
(name, required, default) tuples (default None when required): the table both bindings are
generated from, for tests that keep _core.pyi and the references in step.)doc");

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
