"""Pretrained networks made fine-tunable.

- :mod:`pyft.models.loading`: :func:`load_model` / :func:`wrap_model` (model specs, weights
  files, head surgery);
- :mod:`pyft.models.model`: :class:`FineTunableModel`, the body + new head + blocks;
- :mod:`pyft.models.blocks`: :class:`Block` and where each family's blocks are;
- :mod:`pyft.models.adapters`: one adapter per architecture family (blocks, split after block
  k, hash of the frozen part up to a cut);
- :mod:`pyft.models.splitting`: the generic splits (text encoder layers, ``torch.fx``).
"""

from pyft.models.blocks import Block
from pyft.models.loading import (
    available_models,
    find_head,
    load_model,
    load_weights_into,
    read_state_dict,
    replace_head,
    wrap_model,
)
from pyft.models.model import FineTunableModel

__all__ = ["load_model", "wrap_model", "FineTunableModel", "Block", "available_models",
           "read_state_dict", "load_weights_into", "find_head", "replace_head"]
