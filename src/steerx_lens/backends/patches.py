"""Compatibility patches steerx_lens applies to the stacks it wraps, all listed here.

Each is applied explicitly by the adapter that needs it, changes no result (only speed, or a
bug of a pinned version), and can be switched off with :func:`disable` (before or after the
model is wrapped):

- ``"bridge_kv_cache"`` (:func:`fix_bridge_kv_cache`): TransformerLens 3.9's
  ``AttentionBridge`` ignores the KV cache that transformers 5 passes as ``cache=``. Applied when
  a ``TransformerBridge`` is wrapped (and before each bridge generation). Disabled, bridge
  generation refuses with a :class:`~steerx_lens.errors.BackendError` (cached steps would be
  wrong); forward passes are not affected.
- ``"tl_weight_layout"`` (:func:`relayout_weights`): stores a ``HookedTransformer``'s linear
  weights in the memory layout its forward reads (same values; no per-forward weight copies).
  Applied when a ``HookedTransformer`` is wrapped. Disabled, the weights are left as loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

PATCHES: dict[str, str] = {
    "bridge_kv_cache": "TransformerBridge attention reads transformers 5's cache= argument",
    "tl_weight_layout": "HookedTransformer linear weights stored in the layout forward reads",
}
_disabled: set[str] = set()


def _check(name: str) -> None:
    if name not in PATCHES:
        raise ValueError(f"unknown compatibility patch {name!r}; choose one of {tuple(PATCHES)}")


def disable(name: str) -> None:
    """Stop applying the patch ``name`` (see :data:`PATCHES`)."""
    _check(name)
    _disabled.add(name)


def enable(name: str) -> None:
    """Apply the patch ``name`` again (every patch is enabled by default)."""
    _check(name)
    _disabled.discard(name)


def is_enabled(name: str) -> bool:
    """Whether the patch ``name`` is applied."""
    _check(name)
    return name not in _disabled


# For each TL weight name: the dimension order in which TL's forward reads it as a matrix.
# Storing the weight as a permuted view of a tensor contiguous in that order turns TL's
# per-forward ``.T.contiguous()`` / ``einops.rearrange`` copies into free views.
_READ_ORDER: dict[str, tuple[int, ...]] = {
    "W_gate": (1, 0),
    "W_in": (1, 0),
    "W_out": (1, 0),
    "W_U": (1, 0),
    "W_Q": (0, 2, 1),
    "W_K": (0, 2, 1),
    "W_V": (0, 2, 1),
    "_W_K": (0, 2, 1),
    "_W_V": (0, 2, 1),
    "W_O": (2, 0, 1),
}


def relayout_weights(model: Any) -> int:
    """Store TL's linear weights in the memory layout its forward reads (values unchanged).

    TransformerLens 3.9 runs ``F.linear(x, W.T.contiguous())`` on the MLP and unembedding weights
    and rearranges the attention weights on every forward: full weight copies that took ~62% of
    decoding time on the demo model (the 49152×576 unembedding alone is ~113 MB per token).
    After the re-layout those reads are views and the layout equals HF's ``nn.Linear``.
    Returns the number of weights re-laid out.
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            for name, order in _READ_ORDER.items():
                weight = module._parameters.get(name) if hasattr(module, "_parameters") else None
                if weight is None or weight.ndim != len(order):
                    continue
                if weight.permute(order).is_contiguous():
                    continue
                inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
                weight.data = weight.data.permute(order).contiguous().permute(inverse)
                count += 1
    return count


def fix_bridge_kv_cache() -> None:
    """Make TransformerLens 3.9's bridge attention fill the KV cache under transformers 5.x.

    transformers 5 hands the cache to each attention layer as ``cache=``; the bridge's
    ``AttentionBridge._update_kv_cache`` only reads ``past_key_values`` / ``layer_past``, so the
    cache stayed empty and every cached decoding step attended to itself alone (measured on
    SmolLM2: logits ~22 off, garbage text). The shim passes ``cache`` on under the old name;
    with it a cached step matches a full forward (1e-7 on the tiny model). Idempotent; while
    the patch is disabled (:func:`disable`) the wrapper passes calls through unchanged.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    if getattr(original, "steerx_cache_fix", False):
        return

    def update_kv_cache(self: Any, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if (
            is_enabled("bridge_kv_cache")
            and kwargs.get("past_key_values") is None
            and kwargs.get("cache") is not None
        ):
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    update_kv_cache.steerx_cache_fix = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = update_kv_cache
