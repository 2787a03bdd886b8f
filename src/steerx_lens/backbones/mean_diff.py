"""Contrastive mean-difference vectors (StyleVector / CAA), the model's answers ŷ, the norm scale.

All vectors here are differences of *pooled* activations at one site: for each sequence
(prompt ⊕ response) the activations are averaged over the response positions
(``pool="response_mean"``, the default: measured much better than the last token on the demo
model) or read at the last token (``pool="last"``).

- :func:`mean_diff_vector`: ``mean_i pool h(x_i ⊕ y_i) − pool h(x_i ⊕ ŷ_i)`` — the classic
  all-history vector, with ŷ the model's own greedy answer (or a neutral text).
- SteerX's user-specific component is the same difference over minimal pairs:
  ``mean_i pool h(x_i ⊕ y_i) − pool h(x_i ⊕ y_i^swap)`` where ``y^swap`` replaces only the
  user's preference-driven tokens by the model's prediction under other users' context (same
  token count). :func:`mean_diff_backbone` computes both from :class:`~.base.Sample` pairs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.atomic import write_text
from steerx_lens.backbones.base import SampleLike
from steerx_lens.backbones.inputs import as_encoded
from steerx_lens.backends import get_adapter
from steerx_lens.backends.base import GENERATION_BATCH_SIZE
from steerx_lens.text import EncodedText, pad_batch

Pool = Literal["response_mean", "last"]
DEFAULT_BATCH_SIZE = 8
DEFAULT_ANSWER_TOKENS = 48


@dataclass
class _SharedReads:
    """Reads kept inside a :func:`shared_reads` block, by (site, reduction, tokens, response
    start)."""

    model: Any
    sites: tuple[str, ...]
    values: dict[tuple[str, str, tuple[int, ...], int], Tensor] = field(default_factory=dict)


_SHARED_READS: ContextVar[_SharedReads | None] = ContextVar("steerx_shared_reads", default=None)


@contextmanager
def shared_reads(model: Any, sites: Sequence[str] = ()) -> Iterator[None]:
    """Inside the block, what :func:`pooled_activations` and :func:`residual_norm` read for a
    text at a site is kept and reused (a fit reads many texts more than once: the baseline's
    texts again for the construction and the split halves), and a read at one of ``sites``
    reads all of them in the same forward pass (a sweep over layers pays one pass per text,
    up to its highest layer, instead of one per layer). The model must not change inside the
    block; a block opened inside another for the same model reuses the outer one."""
    active = _SHARED_READS.get()
    if active is not None and active.model is model:
        yield
        return
    token = _SHARED_READS.set(_SharedReads(model, tuple(sites)))
    try:
        yield
    finally:
        _SHARED_READS.reset(token)


def _reduce(
    act: Float[Tensor, "batch pos d_model"], response: Bool[Tensor, "batch pos"], how: str
) -> list[Tensor]:
    """Per row: the activation pooled over the response (``response_mean``), at the last
    token (``last``), or the norms of the response tokens (``norms``)."""
    act = act.float().cpu()
    if how == "last":
        return list(act[:, -1])
    if how == "response_mean":
        weights = response.unsqueeze(-1).float()
        return list((act * weights).sum(1) / weights.sum(1))
    if how == "norms":
        norms = act.norm(dim=-1)
        return [norms[row][response[row]] for row in range(act.shape[0])]
    raise ValueError(f"unknown pool {how!r}; use 'response_mean' or 'last'")


def _pooled_mask(
    texts: Sequence[EncodedText], response: Bool[Tensor, "batch pos"]
) -> Bool[Tensor, "batch pos"]:
    """The positions each row pools: its response, or its ``pooled_positions`` where set
    (shifted by the row's left padding)."""
    if all(text.pooled_positions is None for text in texts):
        return response
    mask = response.clone()
    width = response.shape[1]
    for row, text in enumerate(texts):
        if text.pooled_positions is not None:
            offset = width - len(text.input_ids)
            mask[row] = False
            mask[row, [offset + p for p in text.pooled_positions]] = True
    return mask


def _site_reads(
    model: Any, site: str, texts: Sequence[EncodedText], how: str, batch_size: int
) -> list[Tensor]:
    """:func:`_reduce` of the activations at ``site`` for every text, in length-sorted batches
    (less padding); through the :func:`shared_reads` block when one is open."""
    adapter = get_adapter(model)
    shared = _SHARED_READS.get()
    if shared is not None and shared.model is not model:
        shared = None
    sites = [site] if shared is None else [site, *(s for s in shared.sites if s != site)]

    def key(text: EncodedText, at: str = site) -> tuple[object, ...]:
        return (at, how, tuple(text.input_ids), text.response_start, text.pooled_positions)

    store = shared.values if shared is not None else {}
    missing = list({key(t): t for t in texts if key(t) not in store}.values())
    missing.sort(key=lambda t: len(t.input_ids))
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        inputs, response, _ = pad_batch(chunk, adapter.pad_token_id)
        response = _pooled_mask(chunk, response)
        acts = hooks.activations(model, inputs, sites)
        for at in sites:
            for text, value in zip(chunk, _reduce(acts[at], response, how), strict=True):
                store[key(text, at)] = value
    return [store[key(t)] for t in texts]


def pooled_activations(
    model: Any,
    site: str,
    texts: Sequence[SampleLike],
    pool: Pool = "response_mean",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Float[Tensor, "n d_model"]:
    """Activations at ``site`` pooled over each sequence's response (or its last token).

    ``texts``: token ids, or any text :func:`~steerx_lens.backbones.inputs.as_encoded` takes.
    """
    adapter = get_adapter(model)
    texts = as_encoded(adapter.tokenizer, texts, "texts")
    if not texts:
        raise ValueError("no sequences to read activations from")
    if pool not in ("response_mean", "last"):
        raise ValueError(f"unknown pool {pool!r}; use 'response_mean' or 'last'")
    return torch.stack(_site_reads(model, site, texts, pool, batch_size))


def mean_diff_vector(
    model: Any,
    site: str,
    positives: Sequence[SampleLike],
    negatives: Sequence[SampleLike],
    pool: Pool = "response_mean",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Float[Tensor, " d_model"]:
    """``mean(pool h(positive)) − mean(pool h(negative))`` (paired or not).

    Each text is a whole text (``str``), a ``(prompt, response)`` tuple, a ``HistoryItem``, a
    ``Sample`` or token ids (see :mod:`steerx_lens.backbones.inputs`).
    """
    tokenizer = get_adapter(model).tokenizer
    positives = as_encoded(tokenizer, positives, "positives")
    negatives = as_encoded(tokenizer, negatives, "negatives")
    plus = pooled_activations(model, site, positives, pool, batch_size)
    minus = pooled_activations(model, site, negatives, pool, batch_size)
    return plus.mean(0) - minus.mean(0)


def mean_diff_backbone(
    model: Any,
    site: str,
    chosen: Sequence[SampleLike],
    rejected: Sequence[SampleLike],
    *,
    pool: Pool = "response_mean",
    batch_size: int = DEFAULT_BATCH_SIZE,
    **_: Any,
) -> Float[Tensor, " d_model"]:
    """The ``"mean_diff"`` backbone: :func:`mean_diff_vector` of the samples' tokens.

    It reads :meth:`Sample.encoded`, so a minimal-pair twin is compared token for token with
    its original (same length, only the swapped tokens differ).
    """
    tokenizer = get_adapter(model).tokenizer
    return mean_diff_vector(
        model,
        site,
        as_encoded(tokenizer, chosen, "chosen"),
        as_encoded(tokenizer, rejected, "rejected"),
        pool,
        batch_size,
    )


def residual_norm(
    model: Any, site: str, texts: Sequence[SampleLike], batch_size: int = DEFAULT_BATCH_SIZE
) -> float:
    """Median activation norm at ``site`` over response tokens: the scale for vector strengths
    (record it as ``SteeringVector.residual_norm``). ``texts`` as in :func:`mean_diff_vector`."""
    adapter = get_adapter(model)
    texts = as_encoded(adapter.tokenizer, texts, "texts")
    if not texts:
        raise ValueError("no sequences to measure the residual norm on")
    return float(torch.cat(_site_reads(model, site, texts, "norms", batch_size)).median())


# ------------------------------------------------------------------------------ model answers ŷ


def _answers_key(fingerprint: str, prompts: Sequence[str], max_new_tokens: int) -> str:
    digest = hashlib.sha256(json.dumps([fingerprint, list(prompts), max_new_tokens]).encode())
    return digest.hexdigest()[:20]


def model_answers(
    model: Any,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
    batch_size: int = GENERATION_BATCH_SIZE,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[str]:
    """The model's own greedy answers ŷ to ``prompts`` (chat-formatted prompt texts), decoded
    in length-sorted batches of ``batch_size``.

    Cached as JSON under ``cache_dir`` (keyed by model fingerprint, prompts and length), so the
    baseline's negatives are generated once.
    """
    adapter = get_adapter(model)
    path = None
    if cache_dir is not None:
        key = _answers_key(adapter.fingerprint(), prompts, max_new_tokens)
        path = Path(cache_dir) / f"answers-{key}.json"
        if path.exists():
            return list(json.loads(path.read_text()))
    tokenizer = adapter.tokenizer
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    answers = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="model answers ŷ", disable=not progress):
        chunk = order[start : start + batch_size]
        texts = hooks.generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens)
        for i, text in zip(chunk, texts.texts, strict=True):
            answers[i] = text
    answers = [answer.strip() or "." for answer in answers]
    if path is not None:
        write_text(path, json.dumps(answers))
    return answers
