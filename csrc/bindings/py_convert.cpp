#include "bindings/py_convert.h"

#include "common/check.h"
#include "common/head_checks.h"

namespace pyft {
namespace bind {

using namespace pybind11::literals;

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

namespace {
std::string place_str(int device) {
  return device == kHost ? std::string("host memory") : "cuda:" + std::to_string(device);
}
}  // namespace

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

float* params_ptr(const py::array& p, int64_t expected, bool writeable, const char* name) {
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

/// Row indices (train_rows, val_rows) as a contiguous int64 vector; the range is checked in csrc.
py::array_t<int64_t> to_rows(const py::array& a, const char* name) {
  PYFT_CHECK(a.ndim() == 1 && (a.dtype().kind() == 'i' || a.dtype().kind() == 'u'),
             "%s must be a 1-D integer array of row indices; got %d-D %s", name, (int)a.ndim(),
             dtype_str(a).c_str());
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
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

}  // namespace bind
}  // namespace pyft
