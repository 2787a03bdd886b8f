"""Composable hook points: the entry points users call, over every backend.

The interventions themselves live in :mod:`steerx_lens.core` and are re-exported here, so one
``import steerx_lens.hooks as hooks`` is enough:

- :class:`Steer` adds ``alpha * vector`` (one vector, or one per batch row);
- :class:`Patch` overwrites activations with those of another (aligned) run;
- :class:`Ablate` zeroes or mean-ablates activations;
- :class:`Capture` records activations without changing them;
- any object with a ``site`` and ``__call__(act, ctx)`` (the :class:`Intervention` protocol).

Every entry point also takes :class:`~steerx_lens.vectors.SteeringVector` s directly (applied
through their ``to_steer()``); anything else raises
:class:`~steerx_lens.errors.InterventionTypeError`.

Sites use TransformerLens names (``blocks.{l}.hook_resid_pre|mid|post``, ``hook_attn_out``,
``hook_mlp_out``, ``hook_embed``); each backend translates them. Several interventions at one
site apply in the order given; sites apply in the model's execution order. Positions are
resolved per forward call from a :class:`HookContext`, so padding is never touched and
KV-cached generation steps are found by absolute position.

Entry points: :func:`apply` (context manager), :func:`run` (logits), :func:`score_tokens`,
:func:`activations`, :func:`cache`, :func:`generate` (steered decoding: greedy, or sampled with
a :class:`Decoding`), :func:`intervene` (inside a user's own nnsight trace).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens.backends import get_adapter
from steerx_lens.backends.base import GREEDY, Decoding, ModelAdapter
from steerx_lens.core import (
    POSITION_NAMES,
    Ablate,
    Batch,
    Capture,
    HookContext,
    Inputs,
    Intervention,
    InterventionLike,
    Patch,
    Positions,
    Steer,
    TokenScores,
    as_interventions,
    compose,
    next_token_scores,
)
from steerx_lens.errors import BackendError

__all__ = [
    "GREEDY",
    "POSITION_NAMES",
    "Ablate",
    "Batch",
    "Capture",
    "Decoding",
    "Generation",
    "HookContext",
    "Inputs",
    "Intervention",
    "InterventionLike",
    "Patch",
    "Positions",
    "Steer",
    "TokenScores",
    "activations",
    "apply",
    "cache",
    "compose",
    "generate",
    "intervene",
    "next_token_scores",
    "run",
    "score_tokens",
]


@contextmanager
def apply(model: Any, *interventions: InterventionLike, tokenizer: Any = None) -> Iterator[Any]:
    """Apply interventions to every forward call of ``model`` inside the block.

    Works on HF models, ``HookedTransformer``, ``TransformerBridge`` (torch hooks, removed on
    exit, also when the body raises) and nnsight models (the interventions are attached to every
    :func:`run`/:func:`generate`/:func:`cache` call made inside the block; inside your own
    ``model.trace()`` call :func:`intervene`). Yields the backend adapter.
    """
    adapter = get_adapter(model, tokenizer=tokenizer)
    with adapter.apply(as_interventions(interventions)):
        yield adapter


def _encoded(
    model: Any, inputs: Inputs, tokenizer: Any, padding_side: Literal["left", "right"]
) -> tuple[ModelAdapter, Batch]:
    """The model's adapter and the encoded batch, checked against the model's context."""
    adapter = get_adapter(model, tokenizer=tokenizer)
    batch = adapter.encode(inputs, padding_side=padding_side)
    adapter.check_length(batch.input_ids.shape[1])
    return adapter, batch


def run(
    model: Any,
    inputs: Inputs,
    *interventions: InterventionLike,
    tokenizer: Any = None,
    padding_side: Literal["left", "right"] = "left",
    grad: bool = False,
) -> Float[Tensor, "batch pos vocab"]:
    """Run one forward pass with the interventions and return the logits.

    ``grad=True`` keeps the autograd graph, so a steering vector with ``requires_grad`` can be
    trained through the model (hf, transformer_lens and bridge backends).
    """
    adapter, batch = _encoded(model, inputs, tokenizer, padding_side)
    return adapter.forward(batch, as_interventions(interventions), grad=grad)


def cache(
    model: Any,
    inputs: Inputs,
    sites: Sequence[str],
    *interventions: InterventionLike,
    tokenizer: Any = None,
    padding_side: Literal["left", "right"] = "left",
) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Float[Tensor, "batch pos d"]]]:
    """Run a forward pass (with interventions) and return logits and the activations at ``sites``.

    Activations are recorded after the interventions of the same site.
    """
    store: dict[str, Tensor] = {}
    captures = [Capture(site, store) for site in sites]
    logits = run(
        model, inputs, *interventions, *captures, tokenizer=tokenizer, padding_side=padding_side
    )
    return logits, store


def score_tokens(
    model: Any,
    inputs: Inputs,
    *interventions: InterventionLike,
    tokenizer: Any = None,
    padding_side: Literal["left", "right"] = "left",
    last: int | None = None,
) -> TokenScores:
    """Log-probs of the input's own next tokens and top-1 predictions, with the interventions.

    Equals :func:`next_token_scores` of :func:`run`'s logits, but only ``[batch, pos - 1]``
    values leave the model: on nnsight (local or remote) the reduction runs inside the trace.
    ``last``: score only each row's last ``last`` tokens (left-padded rows end together), the
    other positions NaN and -1; the unembedding then skips them where the backend allows.
    """
    if last is not None and last < 1:
        raise ValueError(f"last must be >= 1 (tokens to score), got {last}")
    adapter, batch = _encoded(model, inputs, tokenizer, padding_side)
    return adapter.score_next_tokens(batch, as_interventions(interventions), last=last)


def activations(
    model: Any,
    inputs: Inputs,
    sites: Sequence[str],
    *interventions: InterventionLike,
    tokenizer: Any = None,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, Float[Tensor, "batch pos d"]]:
    """The activations at ``sites`` (after that site's interventions), without the logits.

    On nnsight only the requested activations are saved (and, remotely, downloaded).
    """
    adapter, batch = _encoded(model, inputs, tokenizer, padding_side)
    return adapter.activations(batch, as_interventions(interventions), list(sites))


@dataclass(frozen=True)
class Generation:
    """Output of :func:`generate`: prompt + generated token ids and the decoded continuations."""

    sequences: Int[Tensor, "batch total"]
    prompt_len: int
    texts: list[str]

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        """The generated token ids only (prompt columns removed)."""
        return self.sequences[:, self.prompt_len :]


def generate(
    model: Any,
    inputs: Inputs,
    *interventions: InterventionLike,
    max_new_tokens: int = 20,
    tokenizer: Any = None,
    decoding: Decoding | None = None,
) -> Generation:
    """Decoding with the interventions applied at the prompt and every generated step.

    Greedy by default. Prompts are left-padded. Uses each backend's fastest exact path: HF
    ``generate`` for HF models and TransformerBridge (KV-cached, see ``fix_bridge_kv_cache``), a
    KV-cached loop for HookedTransformer, and nnsight's ``generate`` with per-step
    interventions. A row that emits EOS is padded afterwards.

    ``decoding=Decoding(do_sample=True, temperature=..., top_p=..., seed=...)`` samples instead
    (hf and bridge backends; others raise :class:`BackendError`): seeded in a forked RNG, so it
    is reproducible for a seed and leaves the global torch RNG untouched. A greedy ``decoding``
    (or ``None``) takes the unchanged greedy path.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    adapter = get_adapter(model, tokenizer=tokenizer)
    sampled = decoding is not None and decoding.do_sample
    if sampled and not adapter.supports_sampling:
        raise BackendError(
            f"sampled decoding is implemented on the hf and bridge backends, not on "
            f"{adapter.name}: generate greedily (decoding=None) or load the model with hf"
        )
    batch = adapter.encode(inputs, padding_side="left")
    adapter.check_length(batch.input_ids.shape[1] + max_new_tokens, "the prompt + new tokens")
    if sampled:
        sequences = adapter.generate(
            batch, as_interventions(interventions), max_new_tokens, decoding=decoding
        )
    else:
        sequences = adapter.generate(batch, as_interventions(interventions), max_new_tokens)
    prompt_len = batch.input_ids.shape[1]
    texts = adapter.tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return Generation(sequences, prompt_len, texts)


def intervene(model: Any, *interventions: InterventionLike, ctx: HookContext | None = None) -> None:
    """Apply interventions inside a user's own nnsight ``model.trace(...)`` block.

    Sites are visited in execution order. ``ctx`` describes padding; by default the input is
    taken as unpadded.
    """
    adapter = get_adapter(model)
    in_trace = getattr(adapter, "intervene_in_trace", None)
    if in_trace is None:
        raise BackendError(
            f"hooks.intervene is for nnsight traces; on a {adapter.name} model use hooks.apply"
        )
    in_trace(as_interventions(interventions), ctx)
