"""Paired statistics for comparing method A against method B over users, each with several
held-out items.

The unit of analysis is the *user*: every user contributes one number, the weighted mean of its
per-item differences (weights are e.g. token counts), and the effect is the plain mean of those
user means. A user with many items therefore cannot dominate the result; its items only make its
own mean more precise.

- :class:`UserItems`: one user's per-item differences and weights (validated);
- :func:`user_means`: the per-user weighted means;
- :func:`two_level_bootstrap`: a percentile CI that resamples users, then items within users;
- :func:`wilcoxon_p`: a two-sided Wilcoxon signed-rank p over the user means;
- :func:`holm`: Holm–Bonferroni adjusted p-values for a family of comparisons;
- :class:`Comparison`, :func:`compare`, :func:`adjust`: one A-vs-B result per metric, and the
  family-wise adjustment over all of them.

The module is agnostic about the sign: it summarises whatever differences the caller passes.
The convention in this package is ``diffs = value(b) - value(a)`` per item for lower-is-better
metrics (NLL), so that a positive mean means *a is better*; for higher-is-better metrics pass
``value(a) - value(b)`` to keep "positive = a better".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

SIGNIFICANCE = 0.05
"""The level every reported p-value (raw, Holm-adjusted) is read against."""

# Random draws per bootstrap chunk (bounds memory; a chunk of 2000 boots × 16 users × 30 items
# is ~1M draws, so the common case runs in one chunk).
_CHUNK_DRAWS = 1 << 21


def _frozen_float_vector(values: Any, name: str) -> np.ndarray:
    """``values`` as a read-only 1-D float64 copy, or ValueError."""
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class UserItems:
    """One user's per-item values for a comparison.

    ``diffs[i]`` is item ``i``'s difference (whatever the caller compares) and ``weights[i]`` its
    weight (e.g. token count, ``>= 0``, positive sum; ``None`` = all ones). The user's statistic is
    the weighted mean ``sum(w * d) / sum(w)``. Arrays are copied to read-only float64; a user with
    no items is an error (the caller drops such users).
    """

    diffs: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        diffs = _frozen_float_vector(self.diffs, "diffs")
        if diffs.size == 0:
            raise ValueError("a user needs at least one item (drop users without items)")
        if self.weights is None:
            weights = np.ones_like(diffs)
            weights.flags.writeable = False
        else:
            weights = _frozen_float_vector(self.weights, "weights")
        if weights.shape != diffs.shape:
            raise ValueError(f"weights shape {weights.shape} != diffs shape {diffs.shape}")
        if not np.all(np.isfinite(diffs)):
            raise ValueError("diffs must be finite (no NaN or inf)")
        if not np.all(np.isfinite(weights)):
            raise ValueError("weights must be finite (no NaN or inf)")
        if np.any(weights < 0):
            raise ValueError("weights must be non-negative")
        if not weights.sum() > 0:
            raise ValueError("weights must have a positive sum")
        object.__setattr__(self, "diffs", diffs)
        object.__setattr__(self, "weights", weights)

    @property
    def mean(self) -> float:
        """The user's weighted mean difference ``sum(w * d) / sum(w)``."""
        return float(np.average(self.diffs, weights=self.weights))


def _nonempty(users: Sequence[UserItems]) -> list[UserItems]:
    """``users`` as a list of :class:`UserItems`; ValueError if empty or of another type."""
    users = list(users)
    if not users:
        raise ValueError("no users to compare")
    for user in users:
        if not isinstance(user, UserItems):
            raise ValueError(f"expected UserItems, got {type(user).__name__}")
    return users


def user_means(users: Sequence[UserItems]) -> np.ndarray:
    """Per-user weighted mean differences, in the order of ``users`` (shape ``(n_users,)``)."""
    return np.array([user.mean for user in _nonempty(users)], dtype=np.float64)


def two_level_bootstrap(
    users: Sequence[UserItems], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the mean over users of the per-user weighted means.

    Each replicate resamples users with replacement, then each drawn user's items with
    replacement (an item keeps its weight), so the interval reflects both between-user spread and
    the within-user noise of a finite item sample. Items of weight 0 are dropped first: they do
    not change a user's mean, and a resample made only of them would have no mean. Vectorised
    over replicates (flattened item draws reduced with ``np.bincount``), drawn in chunks that keep
    memory bounded; deterministic for a given ``seed``.
    """
    users = _nonempty(users)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n_boot = int(n_boot)

    kept = [user.weights > 0 for user in users]
    diffs = np.concatenate([user.diffs[k] for user, k in zip(users, kept, strict=True)])
    weights = np.concatenate([user.weights[k] for user, k in zip(users, kept, strict=True)])
    counts = np.array([int(k.sum()) for k in kept], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_users = len(users)

    rng = np.random.default_rng(seed)
    boot_means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _CHUNK_DRAWS // int(counts.sum()))
    for first in range(0, n_boot, chunk):
        size = min(chunk, n_boot - first)
        who = rng.integers(0, n_users, size=(size, n_users)).ravel()  # drawn user per slot
        n_items = counts[who]  # item draws per slot
        slot = np.repeat(np.arange(who.size), n_items)  # slot of each item draw
        offset = rng.integers(0, np.repeat(n_items, n_items))  # item within its user
        item = np.repeat(starts[who], n_items) + offset
        w = weights[item]
        numerator = np.bincount(slot, weights=w * diffs[item], minlength=who.size)
        denominator = np.bincount(slot, weights=w, minlength=who.size)
        slot_means = (numerator / denominator).reshape(size, n_users)
        boot_means[first : first + size] = slot_means.mean(axis=1)

    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boot_means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilcoxon_p(values: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p over per-user means (``scipy.stats.wilcoxon``).

    None with fewer than 2 values or when all are zero (no test is possible). Zeros use
    ``zero_method="wilcox"`` (scipy's default, also what :func:`metrics.paired_stats` uses): a user
    whose mean difference is exactly 0 has no sign, so it is discarded and the test is on the users
    where the methods differ (Wilcoxon's convention). Pratt's alternative keeps zeros in the
    ranking, which shifts the ranks of the other users by the number of exact zeros, an artefact
    of e.g. a user both methods treat identically rather than evidence about the direction.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("values must be finite (no NaN or inf)")
    if array.size < 2 or not np.any(array != 0):
        return None
    return float(wilcoxon(array, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm–Bonferroni adjusted p-values for one family of tests, keyed like ``pvalues``.

    Step-down: with the ``m`` non-None p sorted ascending, ``adj_(i) = min(1, max_{j<=i} (m - j)
    p_(j))`` (0-based ``j``), which controls the family-wise error rate without independence and
    is monotone in the raw p. None entries (tests that could not be run) stay None and are not
    counted in ``m``. Implemented here because ``scipy.stats.false_discovery_control`` only does
    BH/BY and statsmodels is not a dependency of this package.
    """
    keys = [key for key, p in pvalues.items() if p is not None]
    raw = np.array([pvalues[key] for key in keys], dtype=np.float64)
    if not np.all((raw >= 0) & (raw <= 1)):  # also rejects NaN
        raise ValueError("p-values must be in [0, 1] (or None)")
    order = np.argsort(raw, kind="stable")
    m = raw.size
    stepped = np.maximum.accumulate((m - np.arange(m)) * raw[order])
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = np.minimum(stepped, 1.0)
    result: dict[str, float | None] = {key: None for key in pvalues}
    result.update({key: float(p) for key, p in zip(keys, adjusted, strict=True)})
    return result


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of method ``a`` against ``b`` on ``metric`` over users.

    ``mean`` is the mean over users of the per-user weighted mean differences (sign as passed:
    by this package's convention ``value(b) - value(a)`` for lower-is-better metrics, so positive
    = ``a`` better), ``ci95`` its two-level bootstrap CI, ``wilcoxon_p`` the signed-rank p over the
    user means (None if untestable), ``p_holm`` the Holm-adjusted p over the family (None until
    :func:`adjust`), ``n_positive`` the users whose mean is > 0.
    """

    a: str
    b: str
    metric: str
    mean: float
    ci95: tuple[float, float]
    wilcoxon_p: float | None
    p_holm: float | None
    n_users: int
    n_positive: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``ci95`` as a ``[lo, hi]`` list)."""
        return {
            "a": self.a,
            "b": self.b,
            "metric": self.metric,
            "mean": self.mean,
            "ci95": [self.ci95[0], self.ci95[1]],
            "wilcoxon_p": self.wilcoxon_p,
            "p_holm": self.p_holm,
            "n_users": self.n_users,
            "n_positive": self.n_positive,
        }


def compare(
    a: str,
    b: str,
    metric: str,
    users: Sequence[UserItems],
    n_boot: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Compare ``a`` with ``b`` on ``metric`` from each user's per-item differences.

    Pass ``diffs = value(b) - value(a)`` per item for lower-is-better metrics (and
    ``value(a) - value(b)`` for higher-is-better ones) so that a positive mean = ``a`` better.
    Zero users is a ValueError; ``p_holm`` stays None until :func:`adjust`.
    """
    users = _nonempty(users)
    means = user_means(users)
    return Comparison(
        a=a,
        b=b,
        metric=metric,
        mean=float(means.mean()),
        ci95=two_level_bootstrap(users, n_boot=n_boot, seed=seed, level=0.95),
        wilcoxon_p=wilcoxon_p(means),
        p_holm=None,
        n_users=int(means.size),
        n_positive=int((means > 0).sum()),
    )


def adjust(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons with ``p_holm`` filled by :func:`holm` over all of them as one family."""
    comparisons = list(comparisons)
    adjusted = holm({str(i): c.wilcoxon_p for i, c in enumerate(comparisons)})
    return [dataclasses.replace(c, p_holm=adjusted[str(i)]) for i, c in enumerate(comparisons)]
