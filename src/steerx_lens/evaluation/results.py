"""Typed results of an evaluation run and their JSON form.

The experiment builds these objects; they become JSON only at the file boundary
(``users/<user>.json`` and ``metrics.json``, see ``docs/formats.md``), and a finished user's
file is read back with :meth:`UserRecord.from_json` when a run resumes. Key order and values of
the JSON form are part of the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerx_lens.attribution import Span

Metric = str  # "nll" | "nll_distinct" | "nll_marker" | "nll_pref" | "rouge1" | "rougeL" | "bleu"
NLL_METRICS = ("nll", "nll_distinct", "nll_marker", "nll_pref")
"""Lower is better (nats per token)."""
GENERATION_METRICS = ("rouge1", "rougeL", "bleu")
"""Higher is better (0-100)."""


@dataclass(frozen=True)
class GenerationScores:
    """Mean ROUGE-1 / ROUGE-L F1 and corpus BLEU of a set of generations, in [0, 100]."""

    rouge1: float
    rougeL: float
    bleu: float

    def as_dict(self) -> dict[Metric, float]:
        """``{"rouge1", "rougeL", "bleu"}``."""
        return {"rouge1": self.rouge1, "rougeL": self.rougeL, "bleu": self.bleu}


@dataclass(frozen=True)
class ItemValues:
    """One metric of one method over a user's held-out items: per item its value (None: no
    token counted) and weight (tokens counted; 1 for generation metrics). The user's value is
    the weighted mean: for NLL, the token-pooled NLL."""

    values: list[float | None]
    weights: list[int]

    def pooled(self) -> float | None:
        """The weighted mean over items that have a value, None when none has."""
        pairs = [(v, w) for v, w in zip(self.values, self.weights, strict=True) if v is not None]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else None

    def to_json(self) -> dict[str, list]:
        """``{"values": [...], "weights": [...]}``."""
        return {"values": self.values, "weights": self.weights}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> ItemValues:
        """Inverse of :meth:`to_json`."""
        return cls(list(data["values"]), [int(w) for w in data["weights"]])


@dataclass(frozen=True)
class UserRecord:
    """One finished user: attribution summary, every method's per-item values, generations.

    ``items[method][metric]`` holds the per-item values; ``scores`` derives the user's value
    per method and metric from them. ``steering_norm[method]`` is ``‖alpha·v‖ / ‖h‖`` (the
    vector added, relative to the median residual norm at its site).
    """

    user_id: str
    config_key: str
    n_heldout_tokens: int
    mask_tokens: dict[Metric, int]
    description: str | None
    top_spans: list[Span]
    n_swapped_tokens: int
    steerx_fallback: bool
    items: dict[str, dict[Metric, ItemValues]]
    steering_norm: dict[str, float]
    generations: dict[str, list[str]] | None = None

    @property
    def scores(self) -> dict[str, dict[Metric, float | None]]:
        """Per method and metric, the user's value (:meth:`ItemValues.pooled`)."""
        return {
            method: {metric: values.pooled() for metric, values in by_metric.items()}
            for method, by_metric in self.items.items()
        }

    def to_json(self) -> dict[str, Any]:
        """The JSON form of ``users/<user>.json`` (and of ``metrics.json``'s ``per_user``)."""
        data: dict[str, Any] = {
            "user_id": self.user_id,
            "config_key": self.config_key,
            "n_heldout_tokens": self.n_heldout_tokens,
            "mask_tokens": self.mask_tokens,
            "description": self.description,
            "top_spans": [
                {"text": s.text, "score": s.score, "count": s.count} for s in self.top_spans
            ],
            "n_swapped_tokens": self.n_swapped_tokens,
            "steerx_fallback": self.steerx_fallback,
            "steering_norm": self.steering_norm,
            "scores": self.scores,
            "items": {
                method: {metric: v.to_json() for metric, v in by_metric.items()}
                for method, by_metric in self.items.items()
            },
        }
        if self.generations is not None:
            data["generations"] = self.generations
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UserRecord:
        """Inverse of :meth:`to_json`."""
        return cls(
            user_id=data["user_id"],
            config_key=data["config_key"],
            n_heldout_tokens=data["n_heldout_tokens"],
            mask_tokens=dict(data["mask_tokens"]),
            description=data["description"],
            top_spans=[Span(s["text"], s["score"], s["count"]) for s in data["top_spans"]],
            n_swapped_tokens=data["n_swapped_tokens"],
            steerx_fallback=data["steerx_fallback"],
            items={
                method: {metric: ItemValues.from_json(v) for metric, v in by_metric.items()}
                for method, by_metric in data["items"].items()
            },
            steering_norm=dict(data["steering_norm"]),
            generations=data.get("generations"),
        )


@dataclass(frozen=True)
class RunMetrics:
    """A whole run: its configuration and cells, per-method means over users, the users'
    records, the paired comparisons (Holm-adjusted over the whole family, the primary one
    first), the generation sanity check, the users not evaluated, the items not used and the
    confirmatory family (``goal``, Holm-adjusted among itself)."""

    config: dict[str, Any]
    methods: dict[str, dict[Metric, float | None]]
    per_user: list[UserRecord]
    comparisons: list[dict[str, Any]]
    primary: dict[str, Any] | None
    generation_check: dict[str, Any] | None
    failures: dict[str, str]
    skipped_items: dict[str, list[str]] = field(default_factory=dict)
    goal: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of ``metrics.json`` (``skipped_items`` only when there are some)."""
        data: dict[str, Any] = {
            "config": self.config,
            "primary": self.primary,
            "methods": self.methods,
            "comparisons": self.comparisons,
            "generation_check": self.generation_check,
            "goal": self.goal,
            "per_user": [record.to_json() for record in self.per_user],
            "failures": self.failures,
        }
        if self.skipped_items:
            data["skipped_items"] = self.skipped_items
        return data
