// The keyword options of the training bindings (train_head, train_heads), written once, and the
// one wrapper that runs a Python callback from a native training loop.
//
// Each keyword is a small descriptor (name, C++ type, default, where the value goes). A binding
// lists the descriptors it takes, in signature order; def_trainer turns that list into the
// pybind11 function, so pybind11 still converts every argument, renders the signature and raises
// its usual TypeErrors. The value checks themselves live in csrc (check_options and friends).
// train_head_options() exposes the lists, so tests can hold _core.pyi and tests/reference.py to
// them.
#pragma once

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/train_loop.h"
#include "common/train_options.h"

namespace pyft {
namespace bind {

namespace py = pybind11;

using PerHead = py::array_t<double, py::array::c_style | py::array::forcecast>;

/// Every keyword a training binding takes besides params, features and labels. Choice-valued
/// options stay strings here: they are parsed (and their errors raised) where the trainers always
/// parsed them, after the arrays.
struct TrainArgs {
  TrainOptions opt;
  std::string head, activation, optimizer, schedule, kernel;
  int64_t num_classes = 0, hidden_size = 0;
  std::optional<py::array> train_rows, val_rows, class_weights;
  py::object val_features, val_labels;
  bool bfloat16 = false;
  double label_smoothing = 0.0;
  std::optional<py::function> callback;
  PerHead lrs, weight_decays;
};

/// A keyword with a default: `Name` = DEFAULT, stored by SET (which sees `a` and `v`).
#define PYFT_KW(ID, NAME, TYPE, DEFAULT, SET)                                    \
  struct ID {                                                                    \
    using type = TYPE;                                                           \
    static constexpr const char* name = NAME;                                    \
    static constexpr bool required = false;                                      \
    static py::arg_v arg() { return py::arg_v(name, DEFAULT); }                  \
    static py::object default_value() { return arg().value; }                    \
    static void set(TrainArgs& a, type v) { SET; }                               \
  };
/// A keyword without a default.
#define PYFT_KW_REQUIRED(ID, NAME, TYPE, SET)                                    \
  struct ID {                                                                    \
    using type = TYPE;                                                           \
    static constexpr const char* name = NAME;                                    \
    static constexpr bool required = true;                                       \
    static py::arg arg() { return py::arg(name); }                               \
    static py::object default_value() { return py::none(); }                     \
    static void set(TrainArgs& a, type v) { SET; }                               \
  };

namespace kw {
// The head and its data.
PYFT_KW(head, "head", std::string, "linear", a.head = std::move(v))
PYFT_KW_REQUIRED(num_classes, "num_classes", int64_t, a.num_classes = v)
PYFT_KW(hidden_size, "hidden_size", int64_t, 0, a.hidden_size = v)
PYFT_KW(activation, "activation", std::string, "relu", a.activation = std::move(v))
PYFT_KW_REQUIRED(lrs, "lrs", PerHead, a.lrs = std::move(v))
PYFT_KW_REQUIRED(weight_decays, "weight_decays", PerHead, a.weight_decays = std::move(v))
PYFT_KW(train_rows, "train_rows", std::optional<py::array>, py::none(), a.train_rows = std::move(v))
PYFT_KW(val_features, "val_features", py::object, py::none(), a.val_features = std::move(v))
PYFT_KW(val_labels, "val_labels", py::object, py::none(), a.val_labels = std::move(v))
PYFT_KW(val_rows, "val_rows", std::optional<py::array>, py::none(), a.val_rows = std::move(v))
PYFT_KW(bfloat16, "bfloat16", bool, false, a.bfloat16 = v)
PYFT_KW(class_weights, "class_weights", std::optional<py::array>, py::none(),
        a.class_weights = std::move(v))
PYFT_KW(label_smoothing, "label_smoothing", double, 0.0, a.label_smoothing = v)
// Optimizer (TrainOptions's defaults; train_heads defaults to SGD).
PYFT_KW(optimizer, "optimizer", std::string, "adamw", a.optimizer = std::move(v))
PYFT_KW(optimizer_sgd, "optimizer", std::string, "sgd", a.optimizer = std::move(v))
PYFT_KW(lr, "lr", double, 1e-3, a.opt.lr = v)
PYFT_KW(weight_decay, "weight_decay", double, 0.0, a.opt.weight_decay = v)
PYFT_KW(momentum, "momentum", double, 0.0, a.opt.momentum = v)
PYFT_KW(dampening, "dampening", double, 0.0, a.opt.dampening = v)
PYFT_KW(nesterov, "nesterov", bool, false, a.opt.nesterov = v)
PYFT_KW(beta1, "beta1", double, 0.9, a.opt.beta1 = v)
PYFT_KW(beta2, "beta2", double, 0.999, a.opt.beta2 = v)
PYFT_KW(eps, "eps", double, 1e-8, a.opt.eps = v)
// Schedule.
PYFT_KW(schedule, "schedule", std::string, "constant", a.schedule = std::move(v))
PYFT_KW(warmup_steps, "warmup_steps", int64_t, 0, a.opt.warmup_steps = v)
PYFT_KW(min_lr_ratio, "min_lr_ratio", double, 0.0, a.opt.min_lr_ratio = v)
PYFT_KW(step_size, "step_size", int64_t, 1, a.opt.step_size = v)
PYFT_KW(gamma, "gamma", double, 0.1, a.opt.gamma = v)
// Loop.
PYFT_KW(epochs, "epochs", int64_t, 10, a.opt.epochs = v)
PYFT_KW(batch_size, "batch_size", int64_t, 256, a.opt.batch_size = v)
PYFT_KW(shuffle, "shuffle", bool, true, a.opt.shuffle = v)
PYFT_KW(drop_last, "drop_last", bool, false, a.opt.drop_last = v)
PYFT_KW(seed, "seed", uint64_t, 0, a.opt.seed = v)
PYFT_KW(dropout, "dropout", double, 0.0, a.opt.dropout = static_cast<float>(v))
PYFT_KW(patience, "patience", int64_t, 0, a.opt.patience = v)
PYFT_KW(min_delta, "min_delta", double, 0.0, a.opt.min_delta = v)
PYFT_KW(n_threads, "n_threads", int, 0, a.opt.n_threads = v)
PYFT_KW(kernel, "kernel", std::string, "auto", a.kernel = std::move(v))
PYFT_KW(callback, "callback", std::optional<py::function>, py::none(), a.callback = std::move(v))
// CUDA.
PYFT_KW(stream, "stream", StreamHandle, 0, a.opt.stream = v)
PYFT_KW(cuda_graphs, "cuda_graphs", bool, true, a.opt.cuda_graphs = v)
}  // namespace kw

#undef PYFT_KW
#undef PYFT_KW_REQUIRED

/// An ordered list of keyword descriptors.
template <class... Kw>
struct KwList {};

template <class... Lists>
struct Concat;
template <class... A>
struct Concat<KwList<A...>> {
  using type = KwList<A...>;
};
template <class... A, class... B, class... Rest>
struct Concat<KwList<A...>, KwList<B...>, Rest...> {
  using type = typename Concat<KwList<A..., B...>, Rest...>::type;
};
template <class... Lists>
using Concat_t = typename Concat<Lists...>::type;

namespace kw {
using Data = KwList<train_rows, val_features, val_labels>;
using Loss = KwList<bfloat16, class_weights, label_smoothing>;
using Moments = KwList<momentum, dampening, nesterov, beta1, beta2, eps>;
using Schedule = KwList<schedule, warmup_steps, min_lr_ratio, step_size, gamma>;
using Loop = KwList<epochs, batch_size, shuffle, drop_last, seed>;
using Cuda = KwList<stream, cuda_graphs>;

using TrainHead = Concat_t<KwList<head, num_classes, hidden_size, activation>, Data, Loss,
                           KwList<optimizer, lr, weight_decay>, Moments, Schedule, Loop,
                           KwList<dropout, patience, min_delta, n_threads, kernel, callback>,
                           Cuda>;
using TrainHeads = Concat_t<KwList<num_classes, lrs, weight_decays>, Data, KwList<val_rows>,
                            Loss, KwList<optimizer_sgd>, Moments, Schedule, Loop,
                            KwList<n_threads, callback>, Cuda>;
}  // namespace kw

/// Defines `name`(params, features, labels, *, <Kw...>) calling impl(params, features, labels,
/// args) with every keyword stored in args.
template <class Impl, class... Kw>
void def_trainer(py::module_& m, const char* name, KwList<Kw...>, Impl impl, const char* doc) {
  m.def(
      name,
      [impl](py::array params, py::object features, py::object labels, typename Kw::type... v) {
        TrainArgs a;
        (Kw::set(a, std::move(v)), ...);
        return impl(std::move(params), std::move(features), std::move(labels), a);
      },
      py::arg("params"), py::arg("features"), py::arg("labels"), py::kw_only(), Kw::arg()...,
      doc);
}

/// [(name, required, default), ...] in signature order (default None when required).
template <class... Kw>
py::list describe(KwList<Kw...>) {
  py::list out;
  (out.append(py::make_tuple(Kw::name, Kw::required, Kw::default_value())), ...);
  return out;
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

/// Polls for Ctrl-C (with the GIL); the KeyboardInterrupt is kept in slot.
inline InterruptCheck make_interrupt_check(PyErrorSlot& slot) {
  return [&slot]() -> bool {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      slot.error = std::make_unique<py::error_already_set>();
      return true;
    }
    return false;
  };
}

/// The native loop's view of an optional Python callback. Each record is appended to `history`
/// (when given) and, as the dict to_dict makes of it, passed to the callback with the GIL held:
/// None or a truthy result continues; an exception stops the run and is kept in slot, to be
/// raised once the loop has returned. `callback` must outlive the loop.
template <class Stats, class ToDict>
std::function<bool(const Stats&)> python_callback(const std::optional<py::function>& callback,
                                                  PyErrorSlot& slot, ToDict to_dict,
                                                  std::vector<Stats>* history = nullptr) {
  return [&callback, &slot, to_dict, history](const Stats& st) -> bool {
    if (history) history->push_back(st);
    if (!callback) return true;
    py::gil_scoped_acquire gil;
    try {
      py::object r = (*callback)(to_dict(st));
      return r.is_none() || py::bool_(r);
    } catch (py::error_already_set& e) {
      slot.error = std::make_unique<py::error_already_set>(std::move(e));
      return false;
    }
  };
}

}  // namespace bind
}  // namespace pyft
