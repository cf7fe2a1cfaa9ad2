// train_head on a CUDA device: the linear head is a grid of one (head_grid/head_grid_cuda.cu
// holds the fused loop), with train_head's per-epoch statistics and early stopping on top.
//
// Early stopping keeps its best weights on the host: the grid trainer copies the weights back
// after every epoch anyway (C x D floats, a few MB), so the bookkeeping is the CPU trainer's
// (common/train_loop.h).
#include "common/train_loop.h"
#include "head_grid/head_grid.h"
#include "head_train/head_train.h"

namespace pyft {
namespace cuda {

TrainResult train_head(const HeadSpec& spec, float* params, const Matrix& X,
                       const int64_t* labels, const RowSubset& subset, const Matrix* val_X,
                       const int64_t* val_labels, const LossSpec& loss, const TrainOptions& opt,
                       const EpochCallback& on_epoch, const InterruptCheck& interrupted) {
  const double lr = opt.lr, wd = opt.weight_decay;
  ValidationSet val;
  if (val_X) {
    val.X = val_X;
    val.labels = val_labels;
    val.count = val_X->rows;
  }
  EarlyStopping early(opt, val_X != nullptr, spec.num_params());
  TrainResult res;
  GridEpochCallback grid_cb = [&](const GridEpochStats& g) -> bool {
    EpochStats st;
    st.epoch = g.epoch;
    st.train_loss = g.train_loss[0];
    st.train_accuracy = g.train_accuracy[0];
    st.has_val = g.has_val;
    if (g.has_val) {
      st.val_loss = g.val_loss[0];
      st.val_accuracy = g.val_accuracy[0];
    }
    st.lr = lr * g.lr_factor;
    st.steps = g.steps;
    st.seconds = g.seconds;
    bool stop = false;
    if (early.observe(g.epoch, st.val_loss, params)) {
      res.stopped_early = true;
      stop = true;
    }
    res.best_epoch = early.best_epoch();
    if (!callback_continues(on_epoch, st, res)) stop = true;
    return !stop;
  };
  const GridResult g = cuda::train_heads(spec, 1, params, &lr, &wd, X, labels, subset, val, loss,
                                         opt, grid_cb, interrupted);
  res.epochs_run = g.epochs_run;
  res.steps = g.steps;
  res.interrupted = g.interrupted;
  // The grid reports a callback stop for early stopping too; only the user's callback counts.
  if (res.interrupted) return res;
  early.restore(params);
  return res;
}

}  // namespace cuda
}  // namespace pyft
