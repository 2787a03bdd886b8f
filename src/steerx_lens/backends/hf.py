"""Plain ``transformers`` causal LMs: torch forward hooks on the decoder layers.

Also the fast generation path: HF ``generate`` with the hooks active.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from steerx_lens.backends.base import (
    Batch,
    Decoding,
    ModelAdapter,
    StepTracker,
    generate_kwargs,
    pad_to_length,
    resid_mid_edit,
    seeded,
)
from steerx_lens.backends.layout import get_path, resolve_layout, starts_mid_stack
from steerx_lens.core import Intervention, compose

STACK = "transformers"
"""The package a model of this backend comes from (detection is skipped until it is imported)."""
SUPPORTS_DEVICE_MAP = True


def matches(model: Any) -> bool:
    """Whether ``model`` is a ``transformers`` causal LM (checked after every other backend)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def make_adapter(model: Any, tokenizer: Any) -> ModelAdapter:
    """The adapter of a ``transformers`` model."""
    return HFAdapter(model, tokenizer)


def load_hf_model(
    folder: Path, dtype: torch.dtype, device: str | torch.device, device_map: Any
) -> nn.Module:
    """A local HF folder as a ``transformers`` causal LM in eval mode, never from a hub."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map=device_map, local_files_only=True
    )
    if device_map is None:
        model.to(device)
    return model.eval()


def load(
    folder: Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: Any = None,
) -> nn.Module:
    """Load a local HF folder on this backend."""
    return load_hf_model(folder, dtype, device, device_map)


def position_ids_for(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids that ignore left padding (as HF ``generate`` computes them)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _split_output(output: Any) -> tuple[Tensor, Any]:
    """A module output as (main tensor, rebuild function)."""
    if isinstance(output, Tensor):
        return output, lambda new: new
    return output[0], lambda new: (new, *output[1:])


def install_tracker(module: nn.Module, tracker: StepTracker) -> Any:
    """Forward pre-hook on the top HF module that records the step context."""

    def track(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, n_current = tokens.shape[0], tokens.shape[1]
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, Tensor) or mask.ndim != 2:
            past = kwargs.get("past_key_values")
            past_len = past.get_seq_length() if past is not None else 0
            mask = torch.ones(batch, past_len + n_current, dtype=torch.long, device=tokens.device)
        tracker.update(mask, n_current)

    return module.register_forward_pre_hook(track, with_kwargs=True)


class HFAdapter(ModelAdapter):
    """Adapter for ``transformers`` ``PreTrainedModel`` causal LMs."""

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self.layout = resolve_layout(model)
        self.layers: nn.ModuleList = get_path(model, self.layout.layers)
        self.can_start_mid_stack = starts_mid_stack(model)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def embedding_weight(self) -> Float[Tensor, "vocab d_model"]:
        return self.model.get_input_embeddings().weight

    # ---------------------------------------------------------------- hooks
    @contextmanager
    def _hooked(self, interventions: list[Intervention]) -> Iterator[None]:
        handles = [install_tracker(self.model, self.tracker)]
        try:
            for name, group in self.grouped(interventions):
                handles.extend(self._install(name, group))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.tracker.context = None

    def _install(self, name: str, group: list[Intervention]) -> list[Any]:
        site = self.resolve(name)
        tracker = self.tracker

        def edit(act: Tensor) -> Tensor:
            return compose(group, act, tracker.current(act))

        def output_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            act, rebuild = _split_output(output)
            return rebuild(edit(act))

        if site.kind == "hook_embed":
            return [self.model.get_input_embeddings().register_forward_hook(output_hook)]
        layer = self.layers[site.layer]
        if site.kind == "hook_resid_pre":

            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    return (edit(args[0]), *args[1:]), kwargs
                kwargs["hidden_states"] = edit(kwargs["hidden_states"])
                return args, kwargs

            return [layer.register_forward_pre_hook(pre_hook, with_kwargs=True)]
        if site.kind == "hook_resid_post":
            return [layer.register_forward_hook(output_hook)]
        if site.kind == "hook_mlp_out":
            return [getattr(layer, self.layout.mlp).register_forward_hook(output_hook)]
        attention = getattr(layer, self.layout.attention)
        if site.kind == "hook_attn_out":
            return [attention.register_forward_hook(output_hook)]
        stash: dict[str, Tensor] = {}

        def remember_resid_pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            stash["resid_pre"] = args[0] if args else kwargs["hidden_states"]

        def mid_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            attn_out, rebuild = _split_output(output)
            return rebuild(resid_mid_edit(edit, stash.pop("resid_pre"))(attn_out))

        return [
            layer.register_forward_pre_hook(remember_resid_pre, with_kwargs=True),
            attention.register_forward_hook(mid_hook),
        ]

    # ---------------------------------------------------------------- running
    def forward(
        self, batch: Batch, interventions: Sequence[Intervention], grad: bool = False
    ) -> Float[Tensor, "batch pos vocab"]:
        with self.apply(interventions), torch.set_grad_enabled(grad):
            return self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids_for(batch.attention_mask),
                use_cache=False,
            ).logits

    def tail_logits(
        self, batch: Batch, interventions: Sequence[Intervention], keep: int
    ) -> Float[Tensor, "batch keep vocab"]:
        """The unembedding runs on the last ``keep`` positions only (``logits_to_keep``), for
        models whose ``forward`` takes it (the values are the same as a full pass's)."""
        if "logits_to_keep" not in inspect.signature(self.model.forward).parameters:
            return super().tail_logits(batch, interventions, keep)
        with self.apply(interventions):
            return self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids_for(batch.attention_mask),
                use_cache=False,
                logits_to_keep=keep,
            ).logits

    def _tail_logits_from(
        self,
        layer: int,
        residual: Float[Tensor, "batch pos d_model"],
        batch: Batch,
        interventions: Sequence[Intervention],
        keep: int,
    ) -> Float[Tensor, "batch keep vocab"]:
        """The model's own ``forward`` with ``residual`` as ``inputs_embeds`` and its layer list
        cut to the layers from ``layer`` on (restored on exit): masks, rotary embeddings, the
        final norm and the unembedding are the model's, and hooks on the remaining layers fire
        as in a full pass."""
        options = {}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            options["logits_to_keep"] = keep
        with self.apply(interventions), self._layers_from(layer):
            logits = self.model(
                inputs_embeds=residual,
                attention_mask=batch.attention_mask,
                position_ids=position_ids_for(batch.attention_mask),
                use_cache=False,
                **options,
            ).logits
        return logits[:, -keep:]

    @contextmanager
    def _layers_from(self, layer: int) -> Iterator[None]:
        """The model's decoder-layer list holds the layers from ``layer`` on, inside the block."""
        parent_path, _, name = self.layout.layers.rpartition(".")
        parent = get_path(self.model, parent_path) if parent_path else self.model
        setattr(parent, name, self.layers[layer:])
        try:
            yield
        finally:
            setattr(parent, name, self.layers)

    supports_sampling = True

    def generate(
        self,
        batch: Batch,
        interventions: Sequence[Intervention],
        max_new_tokens: int,
        decoding: Decoding | None = None,
    ) -> Int[Tensor, "batch total"]:
        return hf_generate(self, self.model, batch, interventions, max_new_tokens, decoding)


def hf_generate(
    adapter: ModelAdapter,
    hf_model: Any,
    batch: Batch,
    interventions: Sequence[Intervention],
    max_new_tokens: int,
    decoding: Decoding | None = None,
) -> Int[Tensor, "batch total"]:
    """HF ``generate`` with the adapter's hooks active; always ``max_new_tokens`` long.

    Greedy unless ``decoding`` samples; a sampled run is seeded with ``decoding.seed`` in a
    forked RNG (:func:`~steerx_lens.backends.base.seeded`).
    """
    options = generate_kwargs(
        hf_model.generation_config,
        adapter.tokenizer,
        adapter.pad_token_id,
        max_new_tokens,
        decoding,
    )
    sampled = decoding is not None and decoding.do_sample
    rng = seeded(decoding.seed, batch.input_ids.device) if sampled else nullcontext()
    with adapter.apply(interventions), torch.no_grad(), rng:
        out = hf_model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **options
        )
    return pad_to_length(out, batch.input_ids.shape[1] + max_new_tokens, adapter.pad_token_id)
