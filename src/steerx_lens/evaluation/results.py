"""Typed results of an evaluation run and their JSON form.

The experiment builds these objects; they become JSON only at the file boundary
(``users/<user>.json`` and ``metrics.json``, see the file formats page), and a finished user's
file is read back with :meth:`UserRecord.from_json` when a run resumes. Key order and values of
the JSON form are part of the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerx_lens.attribution import Span

Metric = str  # "nll" | "nll_pref" | "rouge1" | "rougeL" | "bleu"


@dataclass(frozen=True)
class GenerationScores:
    """Mean ROUGE-1 / ROUGE-L F1 and corpus BLEU of greedy generations, in [0, 100]."""

    rouge1: float
    rougeL: float
    bleu: float

    def as_dict(self) -> dict[Metric, float]:
        """The JSON form: ``{"rouge1", "rougeL", "bleu"}``."""
        return {"rouge1": self.rouge1, "rougeL": self.rougeL, "bleu": self.bleu}


@dataclass(frozen=True)
class PairedStats:
    """Paired comparison over users of ``a − b``: mean, bootstrap 95% CI, Wilcoxon p."""

    mean: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float | None
    n: int
    n_positive: int

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``metrics.json`` (``ci95`` = ``[low, high]``)."""
        return {
            "mean": self.mean,
            "ci95": [self.ci_low, self.ci_high],
            "wilcoxon_p": self.wilcoxon_p,
            "n_users": self.n,
            "n_positive": self.n_positive,
        }


@dataclass(frozen=True)
class MethodScores:
    """One user's numbers under one method: pooled NLLs (``None`` without tokens) and, with
    generation on, the scores of the greedy continuations."""

    nll: float | None
    nll_pref: float | None
    generation: GenerationScores | None = None

    def as_dict(self) -> dict[Metric, float | None]:
        """The JSON form: ``{"nll", "nll_pref"}`` (+ ``rouge1``, ``rougeL``, ``bleu``)."""
        scores: dict[Metric, float | None] = {"nll": self.nll, "nll_pref": self.nll_pref}
        if self.generation is not None:
            scores.update(self.generation.as_dict())
        return scores

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MethodScores:
        """Inverse of :meth:`as_dict`."""
        generation = None
        if "rouge1" in data:
            generation = GenerationScores(data["rouge1"], data["rougeL"], data["bleu"])
        return cls(data["nll"], data["nll_pref"], generation)


@dataclass(frozen=True)
class UserRecord:
    """One finished user: attribution summary, every method's scores, and generations.

    ``scores`` maps each evaluated method to its scores in the order written (own methods, then
    the ``*_other`` controls when there are other users); ``generations`` is ``None`` when
    generation is off.
    """

    user_id: str
    config_key: str
    n_heldout_tokens: int
    n_pref_tokens: int
    description: str | None
    top_spans: list[Span]
    n_swapped_tokens: int
    steerx_fallback: bool
    scores: dict[str, MethodScores]
    generations: dict[str, list[str]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form of ``users/<user>.json`` (and of ``metrics.json``'s ``per_user``)."""
        data: dict[str, Any] = {
            "user_id": self.user_id,
            "config_key": self.config_key,
            "n_heldout_tokens": self.n_heldout_tokens,
            "n_pref_tokens": self.n_pref_tokens,
            "description": self.description,
            "top_spans": [
                {"text": s.text, "score": s.score, "count": s.count} for s in self.top_spans
            ],
            "n_swapped_tokens": self.n_swapped_tokens,
            "steerx_fallback": self.steerx_fallback,
        }
        data.update({method: scores.as_dict() for method, scores in self.scores.items()})
        if self.generations is not None:
            data["generations"] = self.generations
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], methods: tuple[str, ...]) -> UserRecord:
        """Inverse of :meth:`to_json`; ``methods`` are the keys that hold method scores."""
        return cls(
            user_id=data["user_id"],
            config_key=data["config_key"],
            n_heldout_tokens=data["n_heldout_tokens"],
            n_pref_tokens=data["n_pref_tokens"],
            description=data["description"],
            top_spans=[Span(s["text"], s["score"], s["count"]) for s in data["top_spans"]],
            n_swapped_tokens=data["n_swapped_tokens"],
            steerx_fallback=data["steerx_fallback"],
            scores={k: MethodScores.from_json(v) for k, v in data.items() if k in methods},
            generations=data.get("generations"),
        )


Comparisons = dict[str, dict[Metric, PairedStats | None]]  # method -> metric -> paired stats


@dataclass(frozen=True)
class RunStats:
    """The paired statistics of a run: personalization margins and gains over references.

    ``personalization_margin[mode][metric]`` compares ``<mode>_other`` with ``<mode>``;
    ``gain_over[reference][method][metric]`` compares ``reference`` with ``method``.
    """

    personalization_margin: Comparisons
    gain_over: dict[str, Comparisons]

    def to_json(self) -> dict[str, Any]:
        """The ``stats`` of ``metrics.json`` (``gain_over_<reference>`` keys)."""

        def encode(comparisons: Comparisons) -> dict[str, Any]:
            return {
                method: {m: None if s is None else s.as_dict() for m, s in by_metric.items()}
                for method, by_metric in comparisons.items()
            }

        return {
            "personalization_margin": encode(self.personalization_margin),
            **{f"gain_over_{ref}": encode(c) for ref, c in self.gain_over.items()},
        }


@dataclass(frozen=True)
class RunMetrics:
    """A whole run: its configuration, per-method means over users, the users' records, the
    paired statistics, the users that were not evaluated (why) and the items that could not be
    used (per user: why)."""

    config: dict[str, Any]
    methods: dict[str, dict[Metric, float | None]]
    per_user: list[UserRecord]
    stats: RunStats
    failures: dict[str, str]
    skipped_items: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of ``metrics.json`` (``skipped_items`` only when there are some)."""
        data = {
            "config": self.config,
            "methods": self.methods,
            "per_user": [record.to_json() for record in self.per_user],
            "stats": self.stats.to_json(),
            "failures": self.failures,
        }
        if self.skipped_items:
            data["skipped_items"] = self.skipped_items
        return data
