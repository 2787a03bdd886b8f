"""What every converter shares: imported vectors, checks on exported ones, and applying them.

Vectors of the other libraries carry no strength (it is given where they are applied) and
steer every token position, so imported vectors get ``alpha`` 1 unless told otherwise and are
applied with ``positions="all"`` (:func:`as_steers`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

from torch import Tensor

from steerx_lens.core import parse_site
from steerx_lens.errors import ModelMismatchError, SteerXError, VectorShapeError
from steerx_lens.hooks import Steer
from steerx_lens.vectors import SteeringVector


class InteropError(SteerXError, ValueError):
    """A vector that cannot be converted to or from another tool's format as asked."""


POSITIONS = "all"
"""Where converted vectors steer: every position, as steering-vectors, repeng and llama.cpp do."""


def require(module: str, install: str) -> ModuleType:
    """Import an optional dependency, or say how to install it (``install``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"this conversion needs the {module!r} module: {install}"
        ) from error


def imported(
    tensor: Tensor, layer: int, kind: str, model: Any, source: str, alpha: float, extra: dict
) -> SteeringVector:
    """A vector of another library as ours at ``blocks.{layer}.{kind}`` of ``model``.

    ``layer`` may be negative (counted from the last block, as the other libraries allow);
    the width and the layer are checked against the model.
    """
    from steerx_lens.backends import get_adapter

    adapter = get_adapter(model)
    n_layers, d_model = adapter.n_layers, adapter.d_model
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise InteropError(
            f"{source} vector has layer {layer}, but the model has {n_layers} layers "
            f"(0..{n_layers - 1}, or -{n_layers}..-1): use it with the model it was made for"
        )
    if tensor.ndim != 1 or tensor.shape[0] != d_model:
        raise VectorShapeError(
            f"{source} vector at layer {layer} has shape {tuple(tensor.shape)}, but the model's "
            f"d_model is {d_model}: use it with the model it was made for"
        )
    return SteeringVector(
        vector=tensor,
        site=f"blocks.{index}.{kind}",
        model_fingerprint=adapter.fingerprint(),
        backbone=source,
        alpha=alpha,
        extra={"source": source, "positions": POSITIONS, **extra},
    )


def fingerprint_n_layers(fingerprint: str) -> int:
    """The number of layers recorded in a model fingerprint ``n_layers x d_model : hash``."""
    try:
        return int(fingerprint.split("x")[0])
    except ValueError as error:
        raise InteropError(f"malformed model fingerprint {fingerprint!r}") from error


def layers_by_kind(vectors: Sequence[SteeringVector], target: str) -> tuple[str, dict[int, Tensor]]:
    """The one site kind and ``{layer: tensor}`` of vectors made on one model, one per layer.

    Raises when the vectors are empty, come from different models, mix site kinds or repeat a
    layer (``target`` names the destination format in the messages).
    """
    if not vectors:
        raise InteropError(f"no vectors to convert to {target}: pass at least one SteeringVector")
    fingerprints = {v.model_fingerprint for v in vectors}
    if len(fingerprints) > 1:
        raise ModelMismatchError(
            f"a {target} vector belongs to one model, these come from {sorted(fingerprints)}: "
            "convert each model's vectors separately"
        )
    sites = [
        parse_site(v.site, n_layers=fingerprint_n_layers(v.model_fingerprint)) for v in vectors
    ]
    kinds = {site.kind for site in sites if site is not None}
    if None in sites or len(kinds) != 1:
        raise InteropError(
            f"a {target} vector has one site kind at every layer, got sites "
            f"{[v.site for v in vectors]}: convert the vectors of each kind separately"
        )
    layers = [site.layer for site in sites if site is not None]
    if len(set(layers)) != len(layers):
        raise InteropError(
            f"a {target} vector has one direction per layer, got sites {[v.site for v in vectors]}: "
            "add the vectors of the same site together first"
        )
    return kinds.pop(), {layer: v.vector for layer, v in zip(layers, vectors, strict=True)}


def as_steers(vectors: Iterable[SteeringVector], alpha: float | None = None) -> list[Steer]:
    """One :class:`hooks.Steer` per vector at every position (``positions="all"``), as the
    other libraries apply them; ``alpha`` (their multiplier / coeff / scale) overrides each
    vector's own. Use: ``hooks.run(model, text, *as_steers(vectors, alpha=2.0))``."""
    return [v.to_steer(alpha=alpha, positions=POSITIONS) for v in vectors]
