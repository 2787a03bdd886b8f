"""Convert to and from ``steering_vectors.SteeringVector`` (the ``steering-vectors`` package).

Their vector holds ``layer_activations: dict[int, Tensor]`` and one ``layer_type``; ``apply``
hooks the output of the module ``layer_type`` names in layer ``i`` of the model's decoder layer
list (guessed as ``model.layers.{num}`` for Llama-like models) and adds
``multiplier * activation`` at every token position (``min_token_index=0``). So layer ``i`` is:

- ``decoder_block``: ``blocks.{i}.hook_resid_post`` (the output of decoder block ``i``);
- ``self_attn``: ``blocks.{i}.hook_attn_out``;
- ``mlp``: ``blocks.{i}.hook_mlp_out``.

Negative layers count from the last block, as their hooks index the layer list. The layernorm
layer types have no steerx_lens site. Apply converted vectors at every position
(:func:`steerx_lens.interop.as_steers`, or ``to_steer(positions="all")``); their
``multiplier`` is our ``alpha``. One difference remains: steering-vectors also steers padding
tokens, steerx_lens never does (logits of real tokens agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steerx_lens.interop._common import imported, layers_by_kind, require
from steerx_lens.vectors import SteeringVector

SITE_KIND_OF_LAYER_TYPE: dict[str, str] = {
    "decoder_block": "hook_resid_post",
    "self_attn": "hook_attn_out",
    "mlp": "hook_mlp_out",
}
"""The steerx_lens site kind each steering-vectors ``layer_type`` hooks."""

SOURCE = "steering-vectors"


def from_steering_vectors(sv: Any, model: Any, *, alpha: float = 1.0) -> list[SteeringVector]:
    """One of our vectors per layer of a ``steering_vectors.SteeringVector``, for ``model``.

    The tensors are kept bit for bit; ``alpha`` records the multiplier to apply them with. The
    layer numbers are those of the default layer matching (the model's decoder layer list).
    Apply them at every position: ``hooks.run(model, text, *as_steers(vectors))``.
    """
    kind = SITE_KIND_OF_LAYER_TYPE.get(sv.layer_type)
    if kind is None:
        raise ValueError(
            f"steering-vectors layer_type {sv.layer_type!r} has no steerx_lens site: use "
            f"one of {sorted(SITE_KIND_OF_LAYER_TYPE)}"
        )
    return [
        imported(
            activation.detach().clone(),
            layer,
            kind,
            model,
            SOURCE,
            alpha,
            {"layer_type": sv.layer_type, "layer": layer},
        )
        for layer, activation in sorted(sv.layer_activations.items())
    ]


def to_steering_vectors(vectors: Sequence[SteeringVector]) -> Any:
    """One ``steering_vectors.SteeringVector`` holding our vectors (one model, one site kind,
    one vector per layer). The strength is not included: pass ``multiplier=`` to its ``apply``."""
    kind, layers = layers_by_kind(vectors, SOURCE)
    layer_types = {site_kind: name for name, site_kind in SITE_KIND_OF_LAYER_TYPE.items()}
    if kind not in layer_types:
        raise ValueError(
            f"steering-vectors has no layer type for {kind} (it hooks block, attention and MLP "
            "outputs): a blocks.{l}.hook_resid_pre vector equals one at blocks.{l-1}.hook_resid_post"
        )
    module = require("steering_vectors", "steering-vectors")
    return module.SteeringVector(
        layer_activations={
            layer: tensor.detach().clone() for layer, tensor in sorted(layers.items())
        },
        layer_type=layer_types[kind],
    )
