"""Evaluation on users' held-out text: NLL (all and preference-bearing tokens), generation
metrics, the controls that tell personalization from a generic shift, and paired statistics.

Methods, always compared in the same run:

- ``none``: no steering; ``history_prompt``: the user's history in the prompt, no steering;
- ``baseline``: the user's all-history vector; ``steerx``: the user's SteerX vector;
- ``shared``: the population-mean vector (the same for every user);
- ``baseline_other`` / ``steerx_other``: the user's held-out text under *other* users' vectors
  of that mode, averaged over those users.

``nll_pref`` is the NLL on the held-out tokens whose patch-CE under the user's own history,
against other users' context, exceeds :data:`PREF_THRESHOLD` nats: the preference-bearing tokens
where a personal vector should help. The personalization margin of a mode is
``NLL(X_other) − NLL(X)`` (positive = the user's own vector fits the user better).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.attribution import DEFAULT_CONFIG, AttributionConfig, token_effects
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.evaluation.results import GenerationScores, PairedStats
from steerx_lens.text import EncodedText, encode_item, pad_batch
from steerx_lens.vectors import SteeringVector

PREF_THRESHOLD = 1.0
STEERED_METHODS = ("baseline", "steerx", "shared")
ALL_METHODS = (
    "none",
    "baseline",
    "steerx",
    "history_prompt",
    "shared",
    "baseline_other",
    "steerx_other",
)
GENERATION_METHODS = ("none", "baseline", "steerx", "history_prompt", "shared")


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
    """
    adapter = get_adapter(model)
    vectors = list(vectors) if vectors is not None else [None] * len(texts)
    if len(vectors) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    out: list[Tensor] = [torch.empty(0)] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
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
        nll = -hooks.score_tokens(model, inputs, *interventions).logp.cpu()
        for row, index in enumerate(chunk):
            out[index] = nll[row][response[row, 1:]]
    return out


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
    """Mean ROUGE-1 / ROUGE-L F1 (``rouge-score``) and corpus BLEU (``sacrebleu``), in [0, 100]."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    rouge1, rouge_l = [], []
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        rouge1.append(scores["rouge1"].fmeasure)
        rouge_l.append(scores["rougeL"].fmeasure)
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    return GenerationScores(
        rouge1=100.0 * float(np.mean(rouge1)),
        rougeL=100.0 * float(np.mean(rouge_l)),
        bleu=float(bleu),
    )


# ------------------------------------------------------------------------------ statistics


def paired_stats(differences: Sequence[float], n_boot: int = 5000, seed: int = 0) -> PairedStats:
    """Mean of per-user differences, a percentile bootstrap 95% CI and a Wilcoxon signed-rank p."""
    from scipy.stats import wilcoxon

    values = np.asarray(differences, dtype=float)
    if values.size == 0:
        raise ValueError("no paired differences")
    rng = np.random.default_rng(seed)
    boots = rng.choice(values, size=(n_boot, values.size), replace=True).mean(axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    p_value = None
    if values.size >= 2 and np.any(values != 0):
        p_value = float(wilcoxon(values).pvalue)
    return PairedStats(
        float(values.mean()),
        float(low),
        float(high),
        p_value,
        int(values.size),
        int((values > 0).sum()),
    )
