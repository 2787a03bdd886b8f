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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.atomic import write_text
from steerx_lens.backbones.base import SampleLike
from steerx_lens.backbones.inputs import as_encoded
from steerx_lens.backends import get_adapter
from steerx_lens.backends.base import GENERATION_BATCH_SIZE
from steerx_lens.text import pad_batch

Pool = Literal["response_mean", "last"]
DEFAULT_BATCH_SIZE = 8
DEFAULT_ANSWER_TOKENS = 48


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
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].input_ids))  # less padding
    pooled: dict[int, Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs, response, _ = pad_batch([texts[i] for i in chunk], adapter.pad_token_id)
        acts = hooks.activations(model, inputs, [site])
        act = acts[site].float().cpu()
        if pool == "last":
            values = act[:, -1]
        elif pool == "response_mean":
            weights = response.unsqueeze(-1).float()
            values = (act * weights).sum(1) / weights.sum(1)
        else:
            raise ValueError(f"unknown pool {pool!r}; use 'response_mean' or 'last'")
        for row, index in enumerate(chunk):
            pooled[index] = values[row]
    return torch.stack([pooled[i] for i in range(len(texts))])


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
    norms = []
    for start in range(0, len(texts), batch_size):
        inputs, response, _ = pad_batch(texts[start : start + batch_size], adapter.pad_token_id)
        acts = hooks.activations(model, inputs, [site])
        norms.append(acts[site].float().norm(dim=-1)[response.to(acts[site].device)].cpu())
    return float(torch.cat(norms).median())


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
