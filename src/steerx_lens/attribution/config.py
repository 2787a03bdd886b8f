"""Every option of the attribution in one frozen :class:`AttributionConfig`, with its defaults."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Method = Literal["patch", "prompt"]
Counterfactual = Literal["other_users", "neutral", "mean"]
Measure = Literal["logprob", "prob"]
Rule = Literal["threshold", "topk", "zscore"]

METHODS: tuple[str, ...] = ("patch", "prompt")
COUNTERFACTUALS: tuple[str, ...] = ("other_users", "neutral", "mean")
MEASURES: tuple[str, ...] = ("logprob", "prob")
RULES: tuple[str, ...] = ("threshold", "topk", "zscore")

DEFAULT_K_COUNTERFACTUAL = 2
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_CONTEXT_TOKENS = 512
DEFAULT_SITES: tuple[str, ...] = ("blocks.0.hook_resid_pre",)
"""Patching the input of layer 0 at the context positions = running the counterfactual context
with every position kept (the full counterfactual). Later sites restrict the intervention to the
layers from there on (the response still sees the user's context below that layer)."""
DEFAULT_THRESHOLDS: dict[str, float] = {"logprob": 1.0, "prob": 0.05}
"""Selection thresholds: 1 nat (DESIGN: sign-offs ≈ +12, others ≈ 0 ± 0.3); 0.05 (NextQuill)."""
DEFAULT_TOPK = 3
DEFAULT_Z = 2.0
STOPWORDS: frozenset[str] = frozenset(
    """a an the and or but nor of to in on at for with by from as into onto about over under
    up down out off is are was were be been being am it its it's this that these those i you he
    she we they me him her us them my your his our their mine yours so if then than too very
    not no do does did done can could will would shall should may might must have has had
    just also more most some any all each every there here what which who whom whose how when
    where why s t""".split()
)
"""Spans made only of these words (or punctuation) are skipped when ranking (``stopwords=``)."""


@dataclass(frozen=True)
class AttributionConfig:
    """How causal token effects are estimated (stage 1) and spans selected and ranked (stage 2).

    Effects: ``method="patch"`` patches the context positions at ``sites`` (default
    :data:`DEFAULT_SITES`) with a counterfactual block of the same length: ``k_counterfactual``
    other users' blocks (``counterfactual="other_users"``, drawn per user, seeded by ``seed`` and
    the user's id),
    a ``"neutral"`` block, or the ``"mean"`` activation over other users' context positions;
    ``method="prompt"`` (NextQuill) deletes the history block from the prompt instead.
    ``measure`` is a log-probability (nats) or probability difference. Each sequence (prompt with
    the leave-one-out history block, plus the response) is fit to ``max_context_tokens`` (oldest
    other items dropped first); forward passes run ``batch_size`` rows at a time.

    Selection (see :func:`~steerx_lens.attribution.spans.select_tokens`): ``rule="threshold"``
    (``threshold``, ``None`` = :data:`DEFAULT_THRESHOLDS` of the measure), ``"topk"`` (``top_k``
    per item) or ``"zscore"`` (``z``); spans made only of ``stopwords`` or punctuation are skipped.
    """

    method: Method = "patch"
    counterfactual: Counterfactual = "other_users"
    measure: Measure = "logprob"
    k_counterfactual: int = DEFAULT_K_COUNTERFACTUAL
    sites: Sequence[str] | None = None
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    rule: Rule = "threshold"
    threshold: float | None = None
    top_k: int = DEFAULT_TOPK
    z: float = DEFAULT_Z
    stopwords: frozenset[str] = STOPWORDS

    def __post_init__(self) -> None:
        if self.sites is not None:
            object.__setattr__(self, "sites", tuple(self.sites))
        for value, allowed, name in (
            (self.method, METHODS, "method"),
            (self.counterfactual, COUNTERFACTUALS, "counterfactual"),
            (self.measure, MEASURES, "measure"),
            (self.rule, RULES, "selection rule"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        for count, name in (
            (self.k_counterfactual, "k_counterfactual"),
            (self.batch_size, "batch_size"),
        ):
            if count < 1:
                raise ValueError(f"{name} must be at least 1, got {count}")
        if self.max_context_tokens < 2:
            raise ValueError(
                f"max_context_tokens must be at least 2, got {self.max_context_tokens}"
            )
        if self.method == "prompt" and self.sites is not None:
            raise ValueError("sites= only applies to method='patch'")

    @property
    def patch_sites(self) -> list[str]:
        """The sites patched by ``method="patch"``: ``sites``, else :data:`DEFAULT_SITES`."""
        return list(self.sites or DEFAULT_SITES)

    @property
    def selection_threshold(self) -> float:
        """``threshold``, else the default threshold of ``measure``."""
        return DEFAULT_THRESHOLDS[self.measure] if self.threshold is None else self.threshold


DEFAULT_CONFIG = AttributionConfig()
"""The defaults: patch other users' contexts (K=2) at layer 0's input, threshold 1 nat."""
