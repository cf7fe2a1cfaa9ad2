"""Type stubs for the native core (csrc/bindings.cpp)."""

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

def train_head(
    params: npt.NDArray[np.float32],
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    head: str = "linear",
    num_classes: int,
    hidden_size: int = 0,
    activation: str = "relu",
    train_rows: Optional[npt.ArrayLike] = None,
    val_features: Optional[npt.ArrayLike] = None,
    val_labels: Optional[npt.ArrayLike] = None,
    bfloat16: bool = False,
    class_weights: Optional[npt.ArrayLike] = None,
    label_smoothing: float = 0.0,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    schedule: str = "constant",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
    epochs: int = 10,
    batch_size: int = 256,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    dropout: float = 0.0,
    patience: int = 0,
    min_delta: float = 0.0,
    n_threads: int = 0,
    kernel: str = "auto",
    callback: Optional[Callable[[Dict[str, Any]], Any]] = None,
) -> Dict[str, Any]: ...
def train_head_lbfgs(
    params: npt.NDArray[np.float32],
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    num_classes: int,
    bfloat16: bool = False,
    class_weights: Optional[npt.ArrayLike] = None,
    label_smoothing: float = 0.0,
    l2: float = 0.0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    ftol: float = 1e-9,
    history: int = 0,
    n_threads: int = 0,
    kernel: str = "auto",
    callback: Optional[Callable[[Dict[str, Any]], Any]] = None,
) -> Dict[str, Any]: ...
def objective(
    params: npt.NDArray[np.float32],
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    head: str = "linear",
    num_classes: int,
    hidden_size: int = 0,
    activation: str = "relu",
    bfloat16: bool = False,
    class_weights: Optional[npt.ArrayLike] = None,
    label_smoothing: float = 0.0,
    l2: float = 0.0,
    n_threads: int = 0,
    kernel: str = "auto",
) -> Tuple[float, npt.NDArray[np.float32]]: ...
def predict(
    params: npt.NDArray[np.float32],
    features: npt.ArrayLike,
    *,
    head: str = "linear",
    num_classes: int,
    hidden_size: int = 0,
    activation: str = "relu",
    bfloat16: bool = False,
    output: str = "logits",
    n_threads: int = 0,
) -> np.ndarray: ...
def gather_rows(
    src: np.ndarray,
    indices: npt.NDArray[np.integer],
    out: Optional[npt.NDArray[np.float32]] = None,
    n_threads: int = 0,
    *,
    bfloat16: bool = False,
) -> npt.NDArray[np.float32]: ...
def epoch_permutation(n: int, seed: int, epoch: int) -> npt.NDArray[np.int64]: ...
def lr_factor(
    schedule: str,
    step: int,
    total: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> float: ...
def num_threads(requested: int = 0) -> int: ...
def blas_config() -> str: ...
def cuda_version() -> int: ...
def has_openmp() -> bool: ...
