"""TransformerLens: ``HookedTransformer`` and ``TransformerBridge``, through their hook points.

Canonical sites are TransformerLens's own names; any other name in ``model.hook_dict``
(``blocks.3.attn.hook_z``, ...) is accepted as a native site. Interventions are installed with
the model's ``hooks()`` context manager, so they stack with the user's own ``model.hooks(...)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens.backends.base import (
    Batch,
    ModelAdapter,
    Site,
    eos_token_ids,
    greedy_decode,
    parse_site,
    unknown_site,
)
from steerx_lens.backends.hf import hf_generate, install_tracker, position_ids_for
from steerx_lens.hooks import Intervention, compose

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


class _TLAdapterBase(ModelAdapter):
    """Shared by HookedTransformer and TransformerBridge: TL names and ``model.hooks``."""

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def max_positions(self) -> int | None:
        n_ctx = getattr(self.model.cfg, "n_ctx", None)
        return int(n_ctx) if isinstance(n_ctx, int) else None

    def resolve(self, name: str) -> Site:
        site = parse_site(name, self.n_layers)  # raises if the layer is out of range
        if name not in self.model.hook_dict:
            raise unknown_site(name, self.n_layers)
        if site is not None:
            return site
        match = _LAYER_RE.match(name)
        return Site(name, int(match.group(1)) if match else -1, "native")

    def site_order(self, name: str) -> tuple[int, int]:
        site = self.resolve(name)
        return site.order if site.kind != "native" else (site.layer, 99)

    # Sites whose hook point cannot be edited in place are emulated (see BridgeAdapter).
    emulate_resid_mid = False

    def _fwd_hooks(self, interventions: list[Intervention]) -> list[tuple[str, Any]]:
        hooks: list[tuple[str, Any]] = []
        for name, group in self.grouped(interventions):

            def edit(act: Tensor, group: list[Intervention] = group) -> Tensor:
                return compose(group, act, self.tracker.current(act))

            site = self.resolve(name)
            if site.kind == "hook_resid_mid" and self.emulate_resid_mid:
                hooks.extend(_resid_mid_hooks(site.layer, edit))
            else:
                hooks.append((name, lambda act, hook, edit=edit: edit(act)))
        return hooks

    def _install_tracker(self) -> Any:
        raise NotImplementedError

    @contextmanager
    def _hooked(self, interventions: list[Intervention]) -> Iterator[None]:
        handle = self._install_tracker()
        try:
            with self.model.hooks(fwd_hooks=self._fwd_hooks(interventions)):
                yield
        finally:
            handle.remove()
            self.tracker.context = None


def _resid_mid_hooks(layer: int, edit: Any) -> list[tuple[str, Any]]:
    """``resid_mid = resid_pre + attn_out``: edit the sum at ``hook_attn_out``."""
    stash: dict[str, Tensor] = {}

    def remember(act: Tensor, hook: Any) -> None:
        stash["resid_pre"] = act

    def edit_sum(act: Tensor, hook: Any) -> Tensor:
        resid_pre = stash.pop("resid_pre")
        return edit(resid_pre + act) - resid_pre

    return [
        (f"blocks.{layer}.hook_resid_pre", remember),
        (f"blocks.{layer}.hook_attn_out", edit_sum),
    ]


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


class HookedTransformerAdapter(_TLAdapterBase):
    """Adapter for ``transformer_lens.HookedTransformer`` (3.x).

    On construction the MLP and unembedding weights are re-laid out in memory
    (:func:`relayout_weights`: same values, no per-forward weight copies).
    """

    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        relayout_weights(model)

    def embedding_weight(self) -> Float[Tensor, "vocab d_model"]:
        return self.model.W_E

    def _install_tracker(self) -> Any:
        tracker = self.tracker

        def track(_module: Any, args: tuple, kwargs: dict) -> None:
            tokens = args[0] if args else kwargs.get("input", kwargs.get("tokens"))
            if not isinstance(tokens, Tensor):
                tracker.context = None  # strings: TL tokenizes itself, no padding info here
                return
            batch, n_current = tokens.shape[0], tokens.shape[1]
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(batch, n_current, dtype=torch.long, device=tokens.device)
            cache = kwargs.get("past_kv_cache")
            previous = getattr(cache, "previous_attention_mask", None) if cache else None
            if previous is not None and previous.shape[1] > 0:
                mask = torch.cat([previous.to(mask.device, mask.dtype), mask], dim=1)
            tracker.update(mask, n_current)

        return self.model.register_forward_pre_hook(track, with_kwargs=True)

    def forward(
        self, batch: Batch, interventions: Sequence[Intervention], grad: bool = False
    ) -> Float[Tensor, "batch pos vocab"]:
        with self.apply(interventions), torch.set_grad_enabled(grad):
            return self.model(batch.input_ids, attention_mask=batch.attention_mask)

    def generate(
        self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int
    ) -> Int[Tensor, "batch total"]:
        """Greedy decoding with TL's KV cache, one token per forward (the fast path).

        ``HookedTransformer.generate`` re-embeds the whole sequence at every step; this loop
        feeds only the new token.
        """
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        model = self.model
        kv_cache = TransformerLensKeyValueCache.init_cache(
            model.cfg, model.cfg.device, batch.input_ids.shape[0]
        )

        def step(sequences: Tensor, mask: Tensor, n_new: int) -> Tensor:
            return model(
                sequences[:, -n_new:], attention_mask=mask[:, -n_new:], past_kv_cache=kv_cache
            )

        eos = eos_token_ids(None, self.tokenizer)
        with self.apply(interventions), torch.no_grad():
            return greedy_decode(step, batch, max_new_tokens, eos, self.pad_token_id)


class BridgeAdapter(_TLAdapterBase):
    """Adapter for ``transformer_lens.model_bridge.TransformerBridge``.

    The bridge runs the wrapped HF model, so the step context is tracked on the HF model and
    generation is HF ``generate`` with the KV cache (after :func:`fix_bridge_kv_cache`).
    """

    name = "bridge"
    # The bridge's hook_resid_mid aliases the second layer norm's input: editing it does not
    # reach the residual stream, so it is emulated through resid_pre + attn_out.
    emulate_resid_mid = True

    def __init__(self, model: Any, tokenizer: Any) -> None:
        fix_bridge_kv_cache()
        super().__init__(model, tokenizer)

    def embedding_weight(self) -> Float[Tensor, "vocab d_model"]:
        return self.model.original_model.get_input_embeddings().weight

    def _install_tracker(self) -> Any:
        return install_tracker(self.model.original_model, self.tracker)

    def forward(
        self, batch: Batch, interventions: Sequence[Intervention], grad: bool = False
    ) -> Float[Tensor, "batch pos vocab"]:
        with self.apply(interventions), torch.set_grad_enabled(grad):
            return self.model(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids_for(batch.attention_mask),
                use_cache=False,
            )

    def generate(
        self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int
    ) -> Int[Tensor, "batch total"]:
        """HF ``generate`` on the bridged model, KV-cached (see :func:`fix_bridge_kv_cache`)."""
        return hf_generate(self, self.model.original_model, batch, interventions, max_new_tokens)


def fix_bridge_kv_cache() -> None:
    """Make TransformerLens 3.9's bridge attention fill the KV cache under transformers 5.x.

    transformers 5 hands the cache to each attention layer as ``cache=``; the bridge's
    ``AttentionBridge._update_kv_cache`` only reads ``past_key_values`` / ``layer_past``, so the
    cache stayed empty and every cached decoding step attended to itself alone (measured on
    SmolLM2: logits ~22 off, garbage text). The shim passes ``cache`` on under the old name;
    with it a cached step matches a full forward (1e-7 on the tiny model). Idempotent.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    if getattr(original, "steerx_cache_fix", False):
        return

    def update_kv_cache(self: Any, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    update_kv_cache.steerx_cache_fix = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = update_kv_cache
