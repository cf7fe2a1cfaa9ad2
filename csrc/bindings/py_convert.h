// Python objects -> the plain C++ views of csrc/ (no copies of features): NumPy arrays, DLPack
// CUDA tensors, labels, row indices, params, head and loss specs. Part of the bindings, the only
// code that includes pybind11.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "common/convert.h"
#include "common/device.h"
#include "common/dlpack.h"
#include "common/head_math.h"

namespace pyft {
namespace bind {

namespace py = pybind11;

std::string dtype_str(const py::array& a);
std::string type_name(py::handle obj);
/// "(2, 3)" / "(4,)", as Python prints a shape.
std::string shape_str(const std::vector<py::ssize_t>& v);

/// The element type of a feature array. bfloat16 arrives either as an ml_dtypes.bfloat16 array or
/// as a 16-bit integer array with bfloat16=True (the bit pattern, e.g.
/// torch_tensor.view(torch.int16).numpy()).
DType feature_dtype(const py::array& a, const char* name, bool bfloat16);
/// A 2-D feature view over any float32/float16/bfloat16/float64 array, any strides, no copy.
Matrix to_matrix(const py::array& a, const char* name, bool bfloat16);

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

/// The DLPack view of `obj` when it lives on a CUDA device (exported for the consumer stream
/// `stream`, so the producer orders its pending work before ours); nullopt for anything else,
/// which then takes the NumPy path.
std::optional<DLView> cuda_tensor(py::handle obj, const char* name, StreamHandle stream);
/// The element type of a CUDA feature tensor (bfloat16=True reads 16-bit integers as bf16 bits).
DType cuda_feature_dtype(const DLView& v, const char* name, bool bfloat16);
/// A 2-D feature view over a CUDA tensor (strides in bytes, as Matrix wants).
Matrix cuda_matrix(const DLView& v, const char* name, bool bfloat16);
/// A 1-D int64 CUDA tensor with unit stride (indices, labels).
const int64_t* cuda_int64_vector(const DLView& v, const char* name, int64_t* n);
/// Arguments of one call must live together: `name` where `ref` is (device or kHost).
void check_same_device(const std::optional<DLView>& v, int device, const char* name,
                       const char* ref);
/// A host argument must already be a NumPy array (as the py::array parameters these replace
/// required): no silent conversion of lists or other objects.
py::array as_host_array(py::handle obj, const char* name);

/// Labels as a contiguous int64 vector (labels are small; copying them is fine).
py::array_t<int64_t> to_labels(const py::array& a, const char* name, int64_t n, int64_t classes);
/// Labels from a host array or a CUDA int64 tensor (copied to the host: they are validated
/// there, and the trainers keep a host copy for batch normalisers).
py::array_t<int64_t> labels_from(py::handle obj, const char* name, int64_t n, int64_t classes,
                                 StreamHandle stream);
/// Features as a Matrix over a host array (kept alive in `hold`) or a CUDA tensor (`dl`).
Matrix features_from(py::handle obj, const char* name, bool bfloat16, StreamHandle stream,
                     py::array* hold, std::optional<DLView>* dl);
/// Row indices (train_rows, val_rows) as a contiguous int64 vector; the range is checked in csrc.
py::array_t<int64_t> to_rows(const py::array& a, const char* name);
/// Row indices as C-contiguous int64: no copy for int64 input, else a copy (indices are small).
py::array_t<int64_t> to_indices(const py::array& a, int64_t n_rows);

float* params_ptr(const py::array& p, int64_t expected, bool writeable = true,
                  const char* name = "params");
HeadSpec make_spec(const std::string& head, int64_t in_features, int64_t hidden, int64_t classes,
                   const std::string& activation);
KernelChoice make_kernel(const std::string& k);

/// class_weights (converted to float32, held here) and label smoothing.
struct WeightsHolder {
  py::array_t<float> arr;
  LossSpec spec;
};

WeightsHolder make_loss(const std::optional<py::array>& class_weights, double label_smoothing,
                        int64_t classes);

}  // namespace bind
}  // namespace pyft
