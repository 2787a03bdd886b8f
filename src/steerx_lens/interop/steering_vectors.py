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
from pathlib import Path
from typing import Any

from steerx_lens.interop._common import InteropError, imported, layers_by_kind, require
from steerx_lens.vectors import SteeringVector

SITE_KIND_OF_LAYER_TYPE: dict[str, str] = {
    "decoder_block": "hook_resid_post",
    "self_attn": "hook_attn_out",
    "mlp": "hook_mlp_out",
}
"""The steerx_lens site kind each steering-vectors ``layer_type`` hooks."""

SOURCE = "steering-vectors"
INSTALL = (
    "pip install scikit-learn && pip install --no-deps steering-vectors (0.12.2 declares "
    "transformers<5 but runs with transformers 5)"
)


def from_steering_vectors(sv: Any, model: Any, *, alpha: float = 1.0) -> list[SteeringVector]:
    """One of our vectors per layer of a ``steering_vectors.SteeringVector``, for ``model``.

    The tensors are kept bit for bit; ``alpha`` records the multiplier to apply them with. The
    layer numbers are those of the default layer matching (the model's decoder layer list).
    Apply them at every position: ``hooks.run(model, text, *as_steers(vectors))``.
    """
    kind = SITE_KIND_OF_LAYER_TYPE.get(sv.layer_type)
    if kind is None:
        raise InteropError(
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
        raise InteropError(
            f"steering-vectors has no layer type for {kind} (it hooks block, attention and MLP "
            "outputs): a blocks.{l}.hook_resid_pre vector equals one at blocks.{l-1}.hook_resid_post"
        )
    module = require("steering_vectors", INSTALL)
    return module.SteeringVector(
        layer_activations={
            layer: tensor.detach().clone() for layer, tensor in sorted(layers.items())
        },
        layer_type=layer_types[kind],
    )


def to_layer_tensors(vectors: Sequence[SteeringVector], path: str | Path) -> Path:
    """Write our vectors as a steering-vectors file: safetensors ``{layer: activation}`` with
    ``layer_type`` in the header (no pickle), read back by :func:`from_layer_tensors` or, in
    steering-vectors, ``SteeringVector({int(k): v for k, v in load_file(path).items()},
    layer_type)``."""
    from safetensors.torch import save

    from steerx_lens.atomic import write_bytes

    kind, layers = layers_by_kind(vectors, SOURCE)
    layer_types = {site_kind: name for name, site_kind in SITE_KIND_OF_LAYER_TYPE.items()}
    if kind not in layer_types:
        raise InteropError(f"steering-vectors has no layer type for {kind}")
    tensors = {str(layer): t.detach().float().contiguous() for layer, t in sorted(layers.items())}
    return write_bytes(path, save(tensors, metadata={"layer_type": layer_types[kind]}))


def from_layer_tensors(path: str | Path, model: Any, *, alpha: float = 1.0) -> list[SteeringVector]:
    """Our vectors for ``model`` from a file written by :func:`to_layer_tensors`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            layer_type = (handle.metadata() or {}).get("layer_type", "")
            tensors = {int(key): handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise InteropError(f"{path} is not a steering-vectors safetensors file: {error}") from error
    kind = SITE_KIND_OF_LAYER_TYPE.get(layer_type)
    if kind is None:
        raise InteropError(f"{path}: unknown layer_type {layer_type!r}")
    return [
        imported(tensor, layer, kind, model, SOURCE, alpha, {"layer_type": layer_type})
        for layer, tensor in sorted(tensors.items())
    ]
