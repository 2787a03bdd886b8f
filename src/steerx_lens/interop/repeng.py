"""Convert to and from repeng's ``ControlVector`` (the ``repeng`` package).

A ``ControlVector`` holds ``model_type`` (the HF ``config.model_type``) and
``directions: dict[int, np.ndarray]``. Key ``i`` indexes the model's decoder layer list
(``model.model.layers``): ``ControlModel`` wraps layer ``i`` and adds ``coeff * direction`` to
its output, and training reads ``hidden_states[i + 1]``, the same output. So key ``i`` is our
``blocks.{i}.hook_resid_post``; negative keys count from the last block, as repeng's
``ControlModel(layer_ids=...)`` and ``read_representations`` do.

repeng steers every position (only left padding is skipped), so apply converted vectors at
every position (:func:`steerx_lens.interop.as_steers`); its ``coeff`` is our ``alpha``. Its
``normalize=True`` and custom ``operator`` options have no steerx_lens equivalent.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from steerx_lens.interop._common import InteropError, imported, layers_by_kind, require
from steerx_lens.vectors import SteeringVector

SOURCE = "repeng"
SITE_KIND = "hook_resid_post"
INSTALL = (
    "pip install 'repeng @ git+https://github.com/vgel/repeng' (repeng 0.4.0, the latest on "
    "PyPI, pins numpy<2 and does not import with NumPy 2)"
)


def _import_repeng() -> ModuleType:
    """The ``repeng`` module, or an error that says how to install a working one."""
    try:
        return require("repeng", INSTALL)
    except AttributeError as error:  # repeng 0.4.0 uses np.float_, removed in NumPy 2
        raise ImportError(
            f"repeng does not import with NumPy {np.__version__} ({error}): {INSTALL}"
        ) from error


def from_repeng(control_vector: Any, model: Any, *, alpha: float = 1.0) -> list[SteeringVector]:
    """One of our vectors per direction of a repeng ``ControlVector``, for ``model``.

    The arrays are kept bit for bit (dtype included); ``alpha`` records the ``coeff`` to apply
    them with. Apply them at every position: ``hooks.run(model, text, *as_steers(vectors))``.
    """
    return [
        imported(
            torch.from_numpy(np.array(direction, copy=True)),
            layer,
            SITE_KIND,
            model,
            SOURCE,
            alpha,
            {"repeng_model_type": control_vector.model_type, "layer": layer},
        )
        for layer, direction in sorted(control_vector.directions.items())
    ]


def to_repeng(vectors: Sequence[SteeringVector], *, model_type: str) -> Any:
    """A repeng ``ControlVector`` holding our ``hook_resid_post`` vectors (one model, one per
    layer). ``model_type`` is the HF ``config.model_type`` (e.g. ``"llama"``). The strength is
    not included: pass ``coeff`` to ``ControlModel.set_control``. bfloat16 vectors become
    float32 (NumPy has no bfloat16; every value is kept)."""
    kind, layers = layers_by_kind(vectors, SOURCE)
    if kind != SITE_KIND:
        raise InteropError(
            f"repeng steers block outputs (hook_resid_post), not {kind}: a "
            "blocks.{l}.hook_resid_pre vector equals one at blocks.{l-1}.hook_resid_post"
        )
    directions = {}
    for layer, tensor in sorted(layers.items()):
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        directions[layer] = tensor.numpy().copy()
    return _import_repeng().ControlVector(model_type=model_type, directions=directions)
