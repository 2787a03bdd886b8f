"""The measurements of an evaluation: per-token NLL of held-out text under steering, the
estimator-defined preference masks, and per-item generation scores.

Methods, always compared in the same run (:data:`ALL_METHODS`):

- ``none``: no steering; ``history_prompt``: the user's fit history in the prompt;
  ``description_prompt``: the user's description in the prompt (system text), no steering;
- ``baseline``: the user's all-history vector; ``steerx``: the user's SteerX vector;
- ``shared``: the mean of the *other* users' baselines (leave-one-out);
- ``decomposed_baseline``: shared + SteerX's personal norm along unit(baseline − shared);
- ``random_swap``: SteerX's anchor and strength with as many selected tokens at random
  positions: the construction itself with shuffled causal effects for constructions fitted to
  the preference-driven tokens (``preference_*``), the minimal-pair direction otherwise;
- ``description_swap``: SteerX's construction and strength built from *another* user's
  description (drawn per user); identical to ``steerx`` for constructions that do not read
  the description. SteerX must beat it for the *user's own* description to be what helps;
- ``baseline_other`` / ``steerx_other``: the user's held-out text under *other* users' vectors
  of that mode (NLL: averaged over up to ``max_other_users`` other users, 5 by default,
  drawn per user; generation: one other user, drawn per user);
- ``description_prompt_other``: *another* user's description in the prompt (drawn as for
  ``*_other``): a description that is specific to its user must do worse than the user's own.

Which tokens each NLL metric counts is :mod:`steerx_lens.evaluation.masks`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.attribution import DEFAULT_CONFIG, AttributionConfig, token_effects
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.evaluation.cells import STEERED_METHODS
from steerx_lens.evaluation.results import GenerationScores
from steerx_lens.text import EncodedText, encode_item, pad_batch
from steerx_lens.vectors import SteeringVector

PREF_THRESHOLD = 1.0
PROMPTED_METHODS = ("history_prompt", "description_prompt")
OTHER_METHODS = {"baseline_other": "baseline", "steerx_other": "steerx"}
OTHER_DESCRIPTION = "description_prompt_other"
ALL_METHODS = (
    "none",
    *STEERED_METHODS,
    "history_prompt",
    "description_prompt",
    "baseline_other",
    "steerx_other",
    "description_prompt_other",
)
DESCRIPTION_SYSTEM_TEMPLATE = "Write as this user writes. {description}"
"""The system text of ``description_prompt``."""


def encode_for_eval(
    tokenizer: Any, item: HistoryItem, history: Sequence[HistoryItem] = ()
) -> EncodedText:
    """Prompt (optionally with the history block) ⊕ the item's output."""
    return encode_item(tokenizer, item, history)


def token_nll(
    model: Any,
    texts: Sequence[EncodedText],
    vectors: Sequence[SteeringVector | None] | None = None,
    alpha: float | None = None,
    batch_size: int = 8,
) -> list[Float[Tensor, " n_response"]]:
    """Per-token NLL of each text's response, each row steered by its own vector (or none).

    Vectors are added at the last prompt token and every response token, as in generation.
    Where one text is scored under several vectors of one layer (the methods and strengths of
    an evaluation or a sweep) and the backend can start a pass at a middle block
    (:attr:`~steerx_lens.backends.base.ModelAdapter.can_start_mid_stack`), the blocks below the
    steering site run once per repeated text and its rows start from there (texts scored once
    take full passes).
    """
    adapter = get_adapter(model)
    vectors = list(vectors) if vectors is not None else [None] * len(texts)
    if len(vectors) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    layer = _shared_prefix_layer(adapter, vectors)
    counts = Counter(_key(text) for text in texts)
    shared = [i for i, t in enumerate(texts) if layer is not None and counts[_key(t)] > 1]
    alone = sorted(set(range(len(texts))) - set(shared))  # full passes: nothing to share
    below = (
        _residuals_before(adapter, [texts[i] for i in shared], layer, batch_size) if shared else {}
    )
    out: list[Tensor] = [torch.empty(0)] * len(texts)
    chunks = [
        (chunk, start_layer)
        for indices, start_layer in ((alone, None), (shared, layer))
        for chunk in _length_sorted_chunks(texts, indices, batch_size)
    ]
    for chunk, start_layer in chunks:
        inputs, response, _ = pad_batch([texts[i] for i in chunk], adapter.pad_token_id)
        interventions = []
        chosen = [vectors[i] for i in chunk]
        if any(v is not None for v in chosen):
            reference = next(v for v in chosen if v is not None)
            rows = torch.stack(
                [
                    torch.zeros_like(reference.vector)
                    if v is None
                    else v.vector * (v.alpha if alpha is None else alpha)
                    for v in chosen
                ]
            )
            steer_mask = response.clone()
            steer_mask[:, :-1] |= response[:, 1:] & ~response[:, :-1]  # the last prompt token
            interventions.append(
                hooks.Steer(reference.site, rows, 1.0, steer_mask, reference.model_fingerprint)
            )
        n_scored = max(1, int(response.sum(dim=1).max()))  # left-padded: responses end rows
        if start_layer is None:
            scores = hooks.score_tokens(model, inputs, *interventions, last=n_scored)
        else:
            batch = adapter.encode(inputs)
            adapter.check_length(batch.input_ids.shape[1])
            residual = _left_padded([below[_key(texts[i])] for i in chunk])
            scores = adapter.score_next_tokens_from(
                start_layer, residual, batch, interventions, last=n_scored
            )
        nll = -scores.logp.cpu()
        for row, index in enumerate(chunk):
            out[index] = nll[row][response[row, 1:]]
    return out


def _key(text: EncodedText) -> tuple[int, ...]:
    return tuple(text.input_ids)


def _length_sorted_chunks(
    texts: Sequence[EncodedText], indices: Sequence[int], batch_size: int
) -> list[list[int]]:
    """``indices`` sorted by text length (less padding), in batches of ``batch_size``."""
    order = sorted(indices, key=lambda i: len(texts[i].input_ids))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _shared_prefix_layer(adapter: Any, vectors: Sequence[SteeringVector | None]) -> int | None:
    """The block whose input rows with the same text can share: that of the one steering site,
    when the backend can start a pass there; None otherwise."""
    sites = {v.site for v in vectors if v is not None}
    if not adapter.can_start_mid_stack or len(sites) != 1:
        return None
    layer = adapter.resolve(sites.pop()).layer
    return layer if layer >= 1 else None


def _residuals_before(
    adapter: Any, texts: Sequence[EncodedText], layer: int, batch_size: int
) -> dict[tuple[int, ...], Float[Tensor, "pos d_model"]]:
    """Block ``layer``'s unsteered input for every distinct text (its own positions only)."""
    distinct = list({_key(t): t for t in texts}.values())
    out = {}
    for chunk in _length_sorted_chunks(distinct, range(len(distinct)), batch_size):
        inputs, _, _ = pad_batch([distinct[i] for i in chunk], adapter.pad_token_id)
        residual = adapter.residual_before(adapter.encode(inputs), layer)
        for row, index in enumerate(chunk):
            text = distinct[index]
            out[_key(text)] = residual[row, residual.shape[1] - len(text.input_ids) :]
    return out


def _left_padded(
    residuals: Sequence[Float[Tensor, "pos d_model"]],
) -> Float[Tensor, "batch width d_model"]:
    """Rows of different lengths, left-padded with zeros (padding is masked out)."""
    width = max(r.shape[0] for r in residuals)
    out = residuals[0].new_zeros((len(residuals), width, residuals[0].shape[1]))
    for row, residual in enumerate(residuals):
        out[row, width - residual.shape[0] :] = residual
    return out


def pooled_nll(nlls: Sequence[Float[Tensor, " n"]]) -> float:
    """The token-pooled NLL of several texts: every token of every text counts once."""
    return float(sum(float(v.sum()) for v in nlls) / sum(v.numel() for v in nlls))


def preference_masks(
    model: Any,
    user: UserHistory,
    population: Sequence[UserHistory],
    threshold: float = PREF_THRESHOLD,
    config: AttributionConfig = DEFAULT_CONFIG,
) -> list[Tensor]:
    """Per held-out item, the tokens whose patch-CE (own history vs other users') > threshold."""
    effects = token_effects(model, user, population, config, targets=user.heldout)
    return [item.effects > threshold for item in effects]


# ------------------------------------------------------------------------------ text metrics


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> GenerationScores:
    """Mean ROUGE-1 / ROUGE-L F1 over items and corpus BLEU (``sacrebleu``), in [0, 100]."""
    import sacrebleu

    items = item_generation_scores(predictions, references)
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    return GenerationScores(
        rouge1=sum(items["rouge1"]) / len(items["rouge1"]),
        rougeL=sum(items["rougeL"]) / len(items["rougeL"]),
        bleu=float(bleu),
    )


def item_generation_scores(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, list[float]]:
    """Per item: ROUGE-1 / ROUGE-L F1 (``rouge-score``, stemmed) and sentence BLEU
    (``sacrebleu``), in [0, 100]. Per-item values so that the paired statistics can resample
    items; a user's value is their mean."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores: dict[str, list[float]] = {"rouge1": [], "rougeL": [], "bleu": []}
    for prediction, reference in zip(predictions, references, strict=True):
        rouge = scorer.score(reference, prediction)
        scores["rouge1"].append(100.0 * rouge["rouge1"].fmeasure)
        scores["rougeL"].append(100.0 * rouge["rougeL"].fmeasure)
        scores["bleu"].append(float(sacrebleu.sentence_bleu(prediction, [reference]).score))
    return scores
