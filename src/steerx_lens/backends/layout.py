"""Where a ``transformers`` causal LM keeps its blocks, as data (like nnterp's rename config).

The hf and nnsight backends find the decoder-layer list, each layer's attention and MLP by
trying the attribute paths of a :class:`ModuleLayout` in order. The default covers Llama,
Mistral, Qwen, Gemma, GPT-2 and GPT-NeoX style models; for another architecture register its
layout under the config's ``model_type`` (no code change in the backends)::

    from steerx_lens.backends.layout import ModuleLayout, register_layout
    register_layout("my_arch", ModuleLayout(layers=("backbone.blocks",), attention=("mixer",)))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from steerx_lens.errors import BackendError


@dataclass(frozen=True)
class ModuleLayout:
    """Attribute paths tried in order: the layer list (from the model), attention and MLP
    (from one layer)."""

    layers: tuple[str, ...] = ("model.layers", "transformer.h", "gpt_neox.layers", "layers")
    attention: tuple[str, ...] = ("self_attn", "attn", "attention")
    mlp: tuple[str, ...] = ("mlp",)


@dataclass(frozen=True)
class ResolvedLayout:
    """The paths that exist in one model: ``layers`` from the model, the others per layer."""

    layers: str
    attention: str
    mlp: str


DEFAULT_LAYOUT = ModuleLayout()
LAYOUTS: dict[str, ModuleLayout] = {}
"""Layouts by HF ``config.model_type``; models of other types use :data:`DEFAULT_LAYOUT`."""


MID_STACK_MODEL_TYPES: set[str] = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3"}
"""``config.model_type`` of the models whose decoder passes ``inputs_embeds`` to its first layer
unchanged (no scaling, no added position embedding), so a pass can start at block ``k`` by
handing block ``k``'s input as ``inputs_embeds`` to the layers from ``k`` on. Each is checked
against full passes on a tiny random model (``tests/test_backends.py``). GPT-2 (its ``forward``
adds position embeddings to ``inputs_embeds``) and Gemma (``transformers`` 4.x scaled them
inside ``forward``) are not listed: their passes always start at the embedding. Add a type here
only after checking its ``forward``."""


def starts_mid_stack(model: nn.Module) -> bool:
    """Whether a pass of ``model`` can start at a middle block (see
    :data:`MID_STACK_MODEL_TYPES`); models mixing attention types per layer (``layer_types``,
    indexed by the layer's position in the list) cannot."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or ()
    return (
        getattr(config, "model_type", None) in MID_STACK_MODEL_TYPES and len(set(layer_types)) <= 1
    )


def register_layout(model_type: str, layout: ModuleLayout) -> None:
    """Use ``layout`` for every model whose ``config.model_type`` is ``model_type``."""
    LAYOUTS[model_type] = layout


def get_path(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path="a.b.c"`` (works on modules and nnsight envoys alike)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _first_child(layer: nn.Module, names: Sequence[str], what: str) -> str:
    for name in names:
        if hasattr(layer, name):
            return name
    raise BackendError(
        f"cannot find the {what} module of {type(layer).__name__} (tried {tuple(names)}); "
        "register the model's layout with steerx_lens.backends.layout.register_layout"
    )


def resolve_layout(model: nn.Module) -> ResolvedLayout:
    """The layer list, attention and MLP paths of ``model``; :class:`BackendError` if absent."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(str(model_type), DEFAULT_LAYOUT)
    for path in layout.layers:
        try:
            layers = get_path(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return ResolvedLayout(
                path,
                _first_child(layers[0], layout.attention, "attention"),
                _first_child(layers[0], layout.mlp, "MLP"),
            )
    raise BackendError(
        f"cannot find the decoder layers of {type(model).__name__} (model_type {model_type!r}; "
        f"tried {layout.layers}); register its layout with "
        "steerx_lens.backends.layout.register_layout"
    )
