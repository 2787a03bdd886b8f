"""TransformerLens: ``HookedTransformer`` and ``TransformerBridge``, through their hook points.

Canonical sites are TransformerLens's own names; any other name in ``model.hook_dict``
(``blocks.3.attn.hook_z``, ...) is accepted as a native site. Interventions are installed with
the model's ``hooks()`` context manager, so they stack with the user's own ``model.hooks(...)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens.backends import patches
from steerx_lens.backends.base import (
    Batch,
    ModelAdapter,
    eos_token_ids,
    greedy_decode,
    resid_mid_edit,
)
from steerx_lens.backends.hf import load_hf_model
from steerx_lens.core import Intervention, Site, compose, parse_site, unknown_site
from steerx_lens.errors import BackendError

STACK = "transformer_lens"
SUPPORTS_DEVICE_MAP = False


def available() -> bool:
    """Whether the installed TransformerLens has ``HookedTransformer`` (3.x; 4.x removed it)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def matches(model: Any) -> bool:
    """Whether ``model`` is a ``HookedTransformer``."""
    if not available():
        return False
    from transformer_lens import HookedTransformer

    return isinstance(model, HookedTransformer)


def make_adapter(model: Any, tokenizer: Any) -> ModelAdapter:
    """The adapter of a ``HookedTransformer``."""
    return HookedTransformerAdapter(model, tokenizer)


def load(
    folder: Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: Any = None,
) -> Any:
    """A local HF folder as a ``HookedTransformer`` (TransformerLens 3.x), offline.

    ``from_pretrained`` refuses names outside TL's official list, so the folder is added to it;
    the weights come from the HF model loaded here, and BOS is not prepended (the plain
    tokenizer the adapter keeps gives every backend the same token ids).
    """
    if not available():
        raise BackendError(
            "the transformer_lens backend (HookedTransformer) needs TransformerLens 3.x; "
            "TransformerLens 4 keeps only TransformerBridge: use the bridge backend"
        )
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    hf_model = load_hf_model(folder, dtype, device, None)
    name = str(folder)
    if name not in loading.OFFICIAL_MODEL_NAMES:
        loading.OFFICIAL_MODEL_NAMES.append(name)
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            name,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            default_prepend_bos=False,
        )
    except (AttributeError, KeyError, NotImplementedError, ValueError) as error:
        architecture = (getattr(hf_model.config, "architectures", None) or ["?"])[0]
        raise BackendError(
            f"HookedTransformer cannot load this {architecture} model ({type(error).__name__}: "
            f"{error}); load it on the bridge backend (TransformerBridge) instead"
        ) from error
    return model.eval()


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
        if (site.name if site else name) not in self.model.hook_dict:
            raise unknown_site(name, self.n_layers)
        if site is not None:
            return site
        match = _LAYER_RE.match(name)
        return Site(name, int(match.group(1)) if match else -1, "native")

    def site_order(self, name: str) -> tuple[int, int]:
        site = self.resolve(name)
        return site.order if site.kind != "native" else (site.layer, 99)

    # Sites whose hook point cannot be edited in place are emulated (see the bridge backend).
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
    """``hook_resid_mid`` edited through ``hook_resid_pre`` + ``hook_attn_out``."""
    stash: dict[str, Tensor] = {}

    def remember(act: Tensor, hook: Any) -> None:
        stash["resid_pre"] = act

    def edit_sum(act: Tensor, hook: Any) -> Tensor:
        return resid_mid_edit(edit, stash.pop("resid_pre"))(act)

    return [
        (f"blocks.{layer}.hook_resid_pre", remember),
        (f"blocks.{layer}.hook_attn_out", edit_sum),
    ]


class HookedTransformerAdapter(_TLAdapterBase):
    """Adapter for ``transformer_lens.HookedTransformer`` (3.x).

    On construction the MLP and unembedding weights are re-laid out in memory
    (:func:`~steerx_lens.backends.patches.relayout_weights`: same values, no per-forward weight
    copies; opt out with ``patches.disable("tl_weight_layout")``).
    """

    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self.can_start_mid_stack = model.cfg.positional_embedding_type != "shortformer"
        if patches.is_enabled("tl_weight_layout"):
            patches.relayout_weights(model)

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

    def _tail_logits_from(
        self,
        layer: int,
        residual: Float[Tensor, "batch pos d_model"],
        batch: Batch,
        interventions: Sequence[Intervention],
        keep: int,
    ) -> Float[Tensor, "batch keep vocab"]:
        """TransformerLens's own ``start_at_layer``."""
        with self.apply(interventions):
            logits = self.model(residual, start_at_layer=layer, attention_mask=batch.attention_mask)
        return logits[:, -keep:]

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
