"""The batching engine: score the response tokens of many sequences, plain or patched.

Rows are :class:`~steerx_lens.text.EncodedText` (ids, context positions, response start), run in
length-sorted, left-padded batches (:func:`steerx_lens.text.pad_batch`) through
:mod:`steerx_lens.hooks`, so any backend of :func:`steerx_lens.backends.get_adapter` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.backends import ModelAdapter
from steerx_lens.text import EncodedText, pad_batch


class Scores(NamedTuple):
    """A row's response scores: log p of each actual token and the model's top-1 prediction."""

    logp: Float[Tensor, " n_response"]
    top: Int[Tensor, " n_response"]


_NO_SCORES = Scores(torch.empty(0), torch.empty(0, dtype=torch.long))
"""Placeholder of a row not yet scored."""
SourceFn = Callable[[list[int], dict[str, Tensor]], dict[str, Tensor]]
"""``source(chunk, inputs)``: the ``[batch, pos, d]`` patch source of every site for the rows
``chunk`` (left-padded like ``inputs``)."""


def chunks(rows: Sequence[EncodedText], batch_size: int) -> Iterator[list[int]]:
    """Row indices in length-sorted chunks of ``batch_size`` (less padding)."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _response_scores(scores: hooks.TokenScores, rows: Sequence[EncodedText]) -> list[Scores]:
    """Scores of each row's response tokens (position ``p`` is predicted at ``p - 1``)."""
    width = scores.logp.shape[1] + 1
    out = []
    for b, row in enumerate(rows):
        offset = width - len(row.input_ids)
        start, stop = offset + row.response_start - 1, offset + len(row.input_ids) - 1
        out.append(Scores(scores.logp[b, start:stop].cpu(), scores.top[b, start:stop].cpu()))
    return out


def _n_scored(rows: Sequence[EncodedText]) -> int:
    """How many final tokens of the left-padded batch hold some row's response."""
    return max(1, max(len(row.input_ids) - row.response_start for row in rows))


class Scorer:
    """Runs rows through ``hooks`` in padded batches and returns response log-probs."""

    def __init__(self, model: Any, adapter: ModelAdapter, batch_size: int) -> None:
        self.model = model
        self.adapter = adapter
        self.batch_size = batch_size

    def plain(self, rows: Sequence[EncodedText]) -> list[Scores]:
        """Unpatched runs."""
        out: list[Scores] = [_NO_SCORES] * len(rows)
        for chunk in chunks(rows, self.batch_size):
            batch_rows = [rows[i] for i in chunk]
            inputs = pad_batch(batch_rows, self.adapter.pad_token_id).inputs
            scores = hooks.score_tokens(
                self.model, inputs, tokenizer=self.adapter.tokenizer, last=_n_scored(batch_rows)
            )
            for i, logp in zip(chunk, _response_scores(scores, batch_rows), strict=True):
                out[i] = logp
        return out

    def patched(
        self, rows: Sequence[EncodedText], site_groups: Sequence[Sequence[str]], sources: SourceFn
    ) -> list[list[Scores]]:
        """Runs with each site group patched at the context positions; ``[group][row]``.

        ``sources(chunk, inputs)`` gives the ``[batch, pos, d]`` patch source of every site for
        the rows ``chunk`` (left-padded like ``inputs``).
        """
        out = [[_NO_SCORES] * len(rows) for _ in site_groups]
        for chunk in chunks(rows, self.batch_size):
            batch_rows = [rows[i] for i in chunk]
            batch = pad_batch(batch_rows, self.adapter.pad_token_id)
            inputs, positions = batch.inputs, batch.context
            source = sources(chunk, inputs)
            for g, group in enumerate(site_groups):
                patches = [hooks.Patch(site, source[site], positions=positions) for site in group]
                scores = hooks.score_tokens(
                    self.model,
                    inputs,
                    *patches,
                    tokenizer=self.adapter.tokenizer,
                    last=_n_scored(batch_rows),
                )
                for i, logp in zip(chunk, _response_scores(scores, batch_rows), strict=True):
                    out[g][i] = logp
        return out

    def activations(self, rows: Sequence[EncodedText], sites: Sequence[str]) -> dict[str, Tensor]:
        """Activations ``[batch, pos, d]`` at ``sites`` of ``rows`` run as one left-padded batch."""
        inputs = pad_batch(rows, self.adapter.pad_token_id).inputs
        return hooks.activations(self.model, inputs, list(sites), tokenizer=self.adapter.tokenizer)
