"""Backend adapters: one per stack, all with the :class:`ModelAdapter` protocol."""

from __future__ import annotations

import sys
import weakref
from typing import Any

from steerx_lens.backends.base import Batch, Inputs, ModelAdapter, Site, parse_site
from steerx_lens.errors import BackendError

_ADAPTERS: weakref.WeakKeyDictionary[Any, ModelAdapter] = weakref.WeakKeyDictionary()


def _default_tokenizer(model: Any) -> Any:
    """The tokenizer attached by :mod:`steerx_lens.models`, or loaded from the model's folder."""
    attached = getattr(model, "steerx_tokenizer", None) or getattr(model, "tokenizer", None)
    if attached is not None:
        return attached
    from transformers import AutoTokenizer

    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", None)
    if not source:
        raise BackendError("the model has no tokenizer attached; pass tokenizer=...")
    return AutoTokenizer.from_pretrained(source)


def get_adapter(model: Any, tokenizer: Any = None, remote: Any = None) -> ModelAdapter:
    """Return the (cached) adapter for ``model``: HF, HookedTransformer, Bridge or nnsight.

    ``remote`` (nnsight models only) sets where every later call on ``model`` runs: ``True``
    (NDIF), ``"local"`` (nnsight's offline simulation of the remote path), a host URL, or
    ``False``; ``None`` keeps the current setting. See :mod:`steerx_lens.remote`.
    """
    if isinstance(model, ModelAdapter):
        adapter = model
    else:
        adapter = _ADAPTERS.get(model)
        if adapter is None or (tokenizer is not None and tokenizer is not adapter.tokenizer):
            adapter = _build_adapter(model, tokenizer)
            _ADAPTERS[model] = adapter
    if remote is not None:
        adapter.set_remote(remote)
    return adapter


def _build_adapter(model: Any, tokenizer: Any) -> ModelAdapter:
    # A TransformerLens or nnsight model implies its library was imported: the stacks that are
    # not in use are never imported here.
    if "nnsight" in sys.modules:
        from nnsight.intervention.envoy import Envoy

        if isinstance(model, Envoy):
            from steerx_lens.backends.nnsight import NNsightAdapter

            return NNsightAdapter(model, tokenizer or model.tokenizer)
    if "transformer_lens" in sys.modules:
        from transformer_lens import HookedTransformer
        from transformer_lens.model_bridge import TransformerBridge

        if isinstance(model, TransformerBridge):
            from steerx_lens.backends.transformer_lens import BridgeAdapter

            return BridgeAdapter(model, tokenizer or _default_tokenizer(model))
        if isinstance(model, HookedTransformer):
            from steerx_lens.backends.transformer_lens import HookedTransformerAdapter

            return HookedTransformerAdapter(model, tokenizer or _default_tokenizer(model))
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from steerx_lens.backends.hf import HFAdapter

        return HFAdapter(model, tokenizer or _default_tokenizer(model))
    raise BackendError(
        f"unsupported model type {type(model).__name__}: steerx_lens supports transformers "
        "causal LMs, HookedTransformer, TransformerBridge and nnsight models"
    )


__all__ = ["Batch", "Inputs", "ModelAdapter", "Site", "get_adapter", "parse_site"]
