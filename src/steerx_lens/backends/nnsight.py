"""nnsight models (``TransformersModel``), local or remote: interventions inside a trace.

Sites map to envoys: ``hook_resid_pre`` -> ``layers[l].input``, ``hook_resid_post`` ->
``layers[l].output`` (a tensor in transformers 5.x, a tuple before: both are handled),
``hook_attn_out`` -> ``layers[l].self_attn.output[0]``, ``hook_mlp_out`` -> ``layers[l].mlp.output``,
``hook_resid_mid`` -> ``resid_pre + attn_out`` (edited as a sum, handed back as a difference).
nnsight requires sites to be visited in execution order within one invoke; adapters sort them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import nnsight
import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens.backends import remote as remote_config
from steerx_lens.backends.base import (
    Batch,
    ModelAdapter,
    finish_after_eos,
    greedy_generate_kwargs,
    left_filled,
    pad_to_length,
    resid_mid_edit,
    weights_digest,
)
from steerx_lens.backends.hf import load_hf_model
from steerx_lens.backends.layout import get_path, resolve_layout
from steerx_lens.backends.remote import RemoteMode
from steerx_lens.core import Capture, HookContext, Intervention, TokenScores, next_token_scores
from steerx_lens.errors import BackendError

STACK = "nnsight"
SUPPORTS_DEVICE_MAP = True


def matches(model: Any) -> bool:
    """Whether ``model`` is an nnsight envoy (e.g. ``TransformersModel``)."""
    from nnsight.intervention.envoy import Envoy

    return isinstance(model, Envoy)


def make_adapter(model: Any, tokenizer: Any) -> ModelAdapter:
    """The adapter of an nnsight model (local until ``remote`` is set)."""
    return NNsightAdapter(model, tokenizer)


def load(
    folder: Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: Any = None,
) -> Any:
    """A local HF folder wrapped as an nnsight ``TransformersModel`` (local execution)."""
    from nnsight.modeling.transformers import TransformersModel

    hf_model = load_hf_model(folder, dtype, device, device_map)
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


class NNsightAdapter(ModelAdapter):
    """Adapter for ``nnsight`` models wrapping a ``transformers`` causal LM, local or remote.

    Each call is one trace (one remote request when ``remote`` is set) per batch, and only what
    the call needs is saved: logits, :class:`~steerx_lens.hooks.TokenScores`, the requested
    activations, or the generated ids.
    """

    name = "nnsight"

    def __init__(self, model: Any, tokenizer: Any, remote: Any = False) -> None:
        super().__init__(model, tokenizer)
        self.hf_model = model._module
        self.layout = resolve_layout(self.hf_model)
        self.remote: RemoteMode = False
        self._fingerprint: str | None = None
        self.set_remote(remote)

    def set_remote(self, remote: Any) -> None:
        """Run later calls on NDIF (``True`` / a host URL), simulated (``"local"``), or here."""
        self.remote = remote_config.prepare(self.model, remote)
        self.can_backpropagate = not self.remote

    @property
    def torch_module(self) -> Any:
        """The HF model the envoy wraps (its parameters are the weights)."""
        return self.hf_model

    @property
    def n_layers(self) -> int:
        return len(get_path(self.hf_model, self.layout.layers))

    @property
    def d_model(self) -> int:
        return int(self.hf_model.get_input_embeddings().weight.shape[1])

    def embedding_weight(self) -> Float[Tensor, "vocab d_model"]:
        return self.hf_model.get_input_embeddings().weight

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.hf_model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    @property
    def device(self) -> torch.device:
        """Where inputs are built: here (CPU) for remote runs, else the weights' device."""
        if self.remote or self.embedding_weight().device.type == "meta":
            return torch.device("cpu")
        return self.embedding_weight().device

    def fingerprint(self) -> str:
        """As on every backend; remote weights (meta here) are read with one small trace."""
        if self._fingerprint is None:
            weight = self.embedding_weight()
            if weight.device.type == "meta":
                embed = get_path(self.model, self._embed_path())
                with (
                    torch.no_grad(),
                    remote_config.translated_errors(self.remote, "the model fingerprint"),
                ):
                    with self.model.trace(torch.zeros(1, 1, dtype=torch.long), remote=self.remote):
                        rows = embed.weight[:32].save()
                weight = rows
            self._fingerprint = f"{self.n_layers}x{self.d_model}:{weights_digest(weight)}"
        return self._fingerprint

    def _layer(self, index: int) -> Any:
        return get_path(self.model, self.layout.layers)[index]

    # ---------------------------------------------------------------- interventions in a trace
    def intervene_in_trace(
        self, interventions: Sequence[Intervention], ctx: HookContext | None
    ) -> None:
        """Apply interventions inside the caller's own ``model.trace(...)`` (see
        :func:`steerx_lens.hooks.intervene`); ``ctx`` defaults to unpadded input."""
        self.validate(interventions)
        self._edit(interventions, lambda act: ctx or HookContext.unpadded(*act.shape[:2]), None)

    def _edit(
        self,
        interventions: Sequence[Intervention],
        context: Callable[[Tensor], HookContext],
        captured: dict[str, Tensor] | None,
    ) -> None:
        """Read, edit and write every site in execution order (must run inside a trace).

        With ``captured`` (a dict created and saved inside the trace) :class:`Capture` records
        into it, so that the activations come back from a remote run too; without it, a
        Capture records into its own store (local runs only).
        """
        resid_pre: dict[int, Tensor] = {}
        for name, group in self.grouped(interventions):
            site = self.resolve(name)

            def edit(act: Tensor, group: list[Intervention] = group) -> Tensor:
                ctx = context(act)  # each intervention moves it to the activation's device
                for intervention in group:
                    if captured is not None and isinstance(intervention, Capture):
                        captured[intervention.site] = act.detach().clone()
                    else:
                        act = intervention(act, ctx)
                return act

            if site.kind == "hook_embed":
                envoy = get_path(self.model, self._embed_path())
                envoy.output = edit(envoy.output)
                continue
            layer = self._layer(site.layer)
            if site.kind == "hook_resid_pre":
                layer.input = resid_pre[site.layer] = edit(layer.input)
            elif site.kind == "hook_resid_post":
                layer.output = _map_first(layer.output, edit)
            elif site.kind == "hook_mlp_out":
                mlp = getattr(layer, self.layout.mlp)
                mlp.output = _map_first(mlp.output, edit)
            elif site.kind == "hook_attn_out":
                attention = getattr(layer, self.layout.attention)
                attention.output = _map_first(attention.output, edit)
            else:  # hook_resid_mid
                before = resid_pre[site.layer] if site.layer in resid_pre else layer.input
                attention = getattr(layer, self.layout.attention)
                attention.output = _map_first(attention.output, resid_mid_edit(edit, before))

    def _embed_path(self) -> str:
        return self._module_path(self.hf_model.get_input_embeddings())

    def _module_path(self, target: Any) -> str:
        """The dotted path of a submodule of the HF model (as nnsight's envoys name it)."""
        for name, module in self.hf_model.named_modules():
            if module is target:
                return name
        raise BackendError(f"module {type(target).__name__} not found in the model")

    # ---------------------------------------------------------------- running
    @contextmanager
    def _hooked(self, interventions: list[Intervention]) -> Iterator[None]:
        previous = self.active
        self.active = [*previous, *interventions]
        try:
            yield
        finally:
            self.active = previous

    def _inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def _trace(
        self,
        batch: Batch,
        interventions: Sequence[Intervention],
        output: Literal["logits", "scores", "activations"],
        grad: bool = False,
    ) -> Any:
        """One trace over ``batch``; returns the requested output (None for activations, which
        land in the :class:`Capture` stores)."""
        interventions = [*self.active, *interventions]
        self.validate(interventions)
        if grad and self.remote:
            raise BackendError(
                "gradients cannot flow back from a remote run; train vectors (e.g. BiPO) on a "
                "local model and apply them remotely"
            )
        ctx = HookContext(
            batch.attention_mask.bool(), batch.input_ids.shape[1], batch.input_ids.shape[1]
        )
        inputs = self._inputs(batch)
        ids = batch.input_ids
        unembed = get_path(self.model, self._module_path(self.hf_model.get_output_embeddings()))
        result = None
        with (
            torch.set_grad_enabled(grad),
            remote_config.translated_errors(self.remote, f"a forward pass ({output})"),
        ):
            with self.model.trace(inputs, remote=self.remote):
                captured = nnsight.save({})
                self._edit(interventions, lambda _act: ctx, captured)
                if output == "logits":
                    result = unembed.output.save()
                elif output == "scores":
                    result = nnsight.save(next_token_scores(unembed.output, ids))
        for intervention in interventions:
            if isinstance(intervention, Capture):
                intervention.store[intervention.site] = captured[intervention.site]
        return result

    def forward(
        self, batch: Batch, interventions: Sequence[Intervention], grad: bool = False
    ) -> Float[Tensor, "batch pos vocab"]:
        return self._trace(batch, interventions, "logits", grad=grad)

    def score_next_tokens(
        self, batch: Batch, interventions: Sequence[Intervention], last: int | None = None
    ) -> TokenScores:
        scores = TokenScores(*self._trace(batch, interventions, "scores"))
        width = scores.logp.shape[1]
        if last is None or last >= width:
            return scores
        return left_filled(TokenScores(scores.logp[:, -last:], scores.top[:, -last:]), width)

    def activations(
        self, batch: Batch, interventions: Sequence[Intervention], sites: Sequence[str]
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        store: dict[str, Tensor] = {}
        captures = [Capture(site, store) for site in sites]
        self._trace(batch, [*interventions, *captures], "activations")
        return store

    def generate(
        self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int
    ) -> Int[Tensor, "batch total"]:
        interventions = [*self.active, *interventions]
        self.validate(interventions)
        if self.remote and any(isinstance(i, Capture) for i in interventions):
            raise BackendError(
                "Capture during remote generation is not supported: generate first, then call "
                "hooks.activations on the generated sequences"
            )
        mask = batch.attention_mask.bool()
        prompt_len = batch.input_ids.shape[1]
        options = greedy_generate_kwargs(
            self.hf_model.generation_config, self.tokenizer, self.pad_token_id, max_new_tokens
        )
        step = {"index": 0}

        def context(_act: Tensor) -> HookContext:
            k = step["index"]
            if k == 0:
                return HookContext(mask, prompt_len, prompt_len)
            ones = torch.ones(mask.shape[0], k, dtype=torch.bool, device=mask.device)
            return HookContext(torch.cat([mask, ones], dim=1), 1, prompt_len)

        inputs = self._inputs(batch)
        # The loop over steps is bounded: if every row stops at EOS early, nnsight cuts it short
        # and skips what follows in the same invoke, hence the result in its own invoke. (No
        # comments inside the traced block: nnsight's remote serialization drops them, which
        # shifts the line numbers its nested tracers look up.)
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            remote_config.translated_errors(self.remote, "a generation"),
        ):
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self.model.generate(**options, remote=self.remote) as tracer:
                with tracer.invoke(inputs):
                    if interventions:
                        for _ in tracer.iter[:max_new_tokens]:
                            self._edit(interventions, context, None)
                            step["index"] += 1
                with tracer.invoke():
                    sequences = tracer.result.save()
        sequences = sequences.to(batch.input_ids.device)
        total = prompt_len + max_new_tokens
        sequences = pad_to_length(sequences, total, self.pad_token_id)
        eos = set(options["eos_token_id"] or ())
        generated = finish_after_eos(sequences[:, prompt_len:], eos, self.pad_token_id)
        return torch.cat([sequences[:, :prompt_len], generated], dim=1)


def _map_first(output: Any, edit: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``edit`` to a module output that is a tensor or a tuple led by one."""
    if isinstance(output, tuple):
        return (edit(output[0]), *output[1:])
    return edit(output)
