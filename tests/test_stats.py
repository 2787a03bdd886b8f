"""Paired statistics over users (``steerx_lens.evaluation.stats``): Holm, the two-level
bootstrap, Wilcoxon and the Comparison record, each tested on the property it must keep."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import bootstrap, wilcoxon

from steerx_lens.evaluation.stats import (
    Comparison,
    UserItems,
    adjust,
    compare,
    holm,
    two_level_bootstrap,
    user_means,
    wilcoxon_p,
)


def make_users(
    n_users: int,
    n_items: int,
    between_sd: float,
    within_sd: float,
    seed: int = 0,
    center: float = 0.5,
) -> list[UserItems]:
    """Users with true means ``center + between_sd * z_u`` and items ``mean_u + within_sd * e``,
    weights 1..20. The user-level ``z_u`` depend on ``seed`` only, not on ``n_items``."""
    rng = np.random.default_rng(seed)
    true_means = center + between_sd * rng.standard_normal(n_users)
    item_rng = np.random.default_rng(seed + 1000)
    return [
        UserItems(
            diffs=mu + within_sd * item_rng.standard_normal(n_items),
            weights=item_rng.integers(1, 21, n_items).astype(float),
        )
        for mu in true_means
    ]


def width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


# ------------------------------------------------------------------------------------- holm


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})


def test_holm_none_stays_none_and_is_not_counted() -> None:
    with_none = holm({"a": 0.01, "x": None, "b": 0.04, "c": 0.03, "y": None, "d": 0.005})
    assert with_none["x"] is None and with_none["y"] is None
    assert list(with_none) == ["a", "x", "b", "c", "y", "d"]  # keys and order kept
    assert {k: v for k, v in with_none.items() if v is not None} == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02}  # family of 4, not 6
    )
    assert holm({"x": None}) == {"x": None}
    assert holm({}) == {}


def test_holm_caps_at_one_and_is_monotone() -> None:
    assert holm({"a": 0.5, "b": 0.6, "c": 0.9}) == {"a": 1.0, "b": 1.0, "c": 1.0}
    # 0.02*3 = 0.06 then 0.025*2 = 0.05 < 0.06: the step-down max keeps it at 0.06
    adjusted = holm({"a": 0.02, "b": 0.025, "c": 0.5})
    assert adjusted == pytest.approx({"a": 0.06, "b": 0.06, "c": 0.5})
    assert holm({"only": 0.3}) == {"only": 0.3}


def test_holm_rejects_invalid_p() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p-values"):
            holm({"a": 0.1, "b": bad})


p_or_none = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0))


@settings(deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=4), p_or_none, max_size=12))
def test_holm_properties(pvalues: dict[str, float | None]) -> None:
    adjusted = holm(pvalues)
    assert list(adjusted) == list(pvalues)
    tested = [k for k, p in pvalues.items() if p is not None]
    assert all(adjusted[k] is None for k, p in pvalues.items() if p is None)
    m = len(tested)
    for k in tested:
        raw, adj = pvalues[k], adjusted[k]
        assert raw <= adj <= 1.0
        assert adj <= min(1.0, m * raw) + 1e-12  # never above Bonferroni
    for i in tested:  # order-preserving
        for j in tested:
            if pvalues[i] <= pvalues[j]:
                assert adjusted[i] <= adjusted[j]


def test_holm_matches_statsmodels_when_available() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")  # not a dependency
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 13):
        raw = rng.uniform(0, 0.2, m)
        raw[: m // 3] = raw[m // 3]  # some ties
        adjusted = holm({str(i): float(p) for i, p in enumerate(raw)})
        reference = multitest.multipletests(raw, method="holm")[1]
        np.testing.assert_allclose([adjusted[str(i)] for i in range(m)], reference, atol=1e-12)


# ------------------------------------------------------------------------------- user means


def test_user_mean_is_weighted_and_users_count_equally() -> None:
    user = UserItems(np.array([1.0, 3.0]), np.array([3.0, 1.0]))
    assert user.mean == pytest.approx(1.5)
    assert UserItems(np.array([1.0, 3.0])).mean == pytest.approx(2.0)  # default weights 1
    # a user with 10,000 items does not dominate: the effect is a mean of user means
    users = [
        UserItems(np.full(3, 1.0), np.ones(3)),
        UserItems(np.full(5, 1.0), np.ones(5)),
        UserItems(np.full(10_000, -5.0), np.full(10_000, 50.0)),
    ]
    np.testing.assert_allclose(user_means(users), [1.0, 1.0, -5.0])
    result = compare("a", "b", "nll", users, n_boot=200)
    assert result.mean == pytest.approx(-1.0)  # not ~ -5 as a pooled item mean would be
    assert result.n_users == 3 and result.n_positive == 2


# -------------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_mean_and_is_deterministic() -> None:
    users = make_users(16, 30, between_sd=0.5, within_sd=1.0)
    mean = float(user_means(users).mean())
    ci = two_level_bootstrap(users, n_boot=2000, seed=3)
    assert ci[0] < mean < ci[1]
    assert two_level_bootstrap(users, n_boot=2000, seed=3) == ci
    assert two_level_bootstrap(users, n_boot=2000, seed=4) != ci
    lo90, hi90 = two_level_bootstrap(users, n_boot=2000, seed=3, level=0.90)
    assert ci[0] <= lo90 < hi90 <= ci[1]


def test_bootstrap_is_fast() -> None:
    users = make_users(16, 30, between_sd=0.5, within_sd=1.0)
    two_level_bootstrap(users, n_boot=50)  # warm-up
    start = time.perf_counter()
    two_level_bootstrap(users, n_boot=2000)
    assert time.perf_counter() - start < 1.0


def test_bootstrap_narrows_with_more_items_per_user() -> None:
    few = make_users(16, 5, between_sd=0.2, within_sd=2.0)
    many = make_users(16, 200, between_sd=0.2, within_sd=2.0)  # same users' true means
    assert width(two_level_bootstrap(many)) < 0.6 * width(two_level_bootstrap(few))


def test_bootstrap_widens_with_between_user_spread() -> None:
    narrow = make_users(16, 30, between_sd=0.2, within_sd=0.5)
    wide = make_users(16, 30, between_sd=2.0, within_sd=0.5)  # same item noise
    assert width(two_level_bootstrap(wide)) > 2.0 * width(two_level_bootstrap(narrow))


def test_two_level_is_wider_than_users_only_when_within_user_noise_is_large() -> None:
    users = make_users(16, 3, between_sd=0.05, within_sd=3.0)
    means = user_means(users)
    users_only = bootstrap(
        (means,), np.mean, n_resamples=2000, method="percentile", random_state=0
    ).confidence_interval
    two_level = two_level_bootstrap(users, n_boot=2000, seed=0)
    assert width(two_level) > 1.2 * (users_only.high - users_only.low)


def test_bootstrap_resamples_weights_with_their_items() -> None:
    # half the items d=0 weight 9, half d=1 weight 1: weighted mean 0.1, unweighted 0.5
    diffs = np.tile([0.0, 1.0], 25)
    weights = np.tile([9.0, 1.0], 25)
    users = [UserItems(diffs, weights) for _ in range(8)]
    lo, hi = two_level_bootstrap(users)
    assert lo < 0.1 < hi and hi < 0.3


def test_zero_weight_items_are_ignored() -> None:
    rng = np.random.default_rng(0)
    base = [UserItems(rng.normal(size=n), rng.uniform(1, 5, n)) for n in (4, 7, 2, 9)]
    padded = [
        UserItems(np.append(u.diffs, [100.0, -100.0]), np.append(u.weights, [0.0, 0.0]))
        for u in base
    ]
    np.testing.assert_allclose(user_means(padded), user_means(base))
    assert two_level_bootstrap(padded, seed=5) == two_level_bootstrap(base, seed=5)


def test_identical_items_give_a_point_interval() -> None:
    users = [UserItems(np.full(n, 0.25), np.arange(1.0, n + 1)) for n in (1, 3, 10)]
    assert two_level_bootstrap(users, n_boot=100) == pytest.approx((0.25, 0.25))


# --------------------------------------------------------------------------------- wilcoxon


def test_wilcoxon_matches_scipy() -> None:
    values = [0.3, -0.1, 0.5, 0.2, 0.0, 0.7, -0.05, 0.4, 0.4]  # a zero and a tie
    expected = wilcoxon(values, zero_method="wilcox").pvalue
    assert wilcoxon_p(values) == pytest.approx(float(expected))
    rng = np.random.default_rng(1)
    values = list(rng.normal(0.2, 1.0, 30))
    assert wilcoxon_p(values) == pytest.approx(float(wilcoxon(values).pvalue))


def test_wilcoxon_none_when_untestable() -> None:
    assert wilcoxon_p([0.0, 0.0, 0.0]) is None
    assert wilcoxon_p([0.4]) is None
    assert wilcoxon_p([]) is None
    with pytest.raises(ValueError, match="finite"):
        wilcoxon_p([0.1, float("nan")])


# ------------------------------------------------------------------------- comparison record


def test_compare_and_adjust() -> None:
    strong = make_users(16, 30, between_sd=0.2, within_sd=0.5, center=1.0)
    null = make_users(16, 30, between_sd=1.0, within_sd=0.5, center=0.0, seed=7)
    zero = [UserItems(np.zeros(4)) for _ in range(5)]
    family = [
        compare("steerx", "none", "nll", strong, n_boot=500),
        compare("steerx", "baseline", "nll", null, n_boot=500),
        compare("steerx", "shared", "nll_pref", zero, n_boot=500),
    ]
    assert all(c.p_holm is None for c in family)
    assert family[2].wilcoxon_p is None and family[2].ci95 == (0.0, 0.0)
    assert family[0].mean > 0 and family[0].ci95[0] > 0 and family[0].n_positive == 16

    adjusted = adjust(family)
    expected = holm({"0": family[0].wilcoxon_p, "1": family[1].wilcoxon_p})
    assert adjusted[0].p_holm == pytest.approx(expected["0"])
    assert adjusted[1].p_holm == pytest.approx(expected["1"])
    assert adjusted[2].p_holm is None
    assert [dataclass_fields(c) for c in adjusted] == [dataclass_fields(c) for c in family]

    record = adjusted[0].as_dict()
    assert list(record) == [
        "a", "b", "metric", "mean", "ci95", "wilcoxon_p", "p_holm", "n_users", "n_positive"
    ]  # fmt: skip
    assert record["ci95"] == [adjusted[0].ci95[0], adjusted[0].ci95[1]]
    assert record["a"] == "steerx" and record["n_users"] == 16


def dataclass_fields(comparison: Comparison) -> tuple:
    """Everything but ``p_holm`` (which :func:`adjust` is the only one to change)."""
    c = comparison
    return (c.a, c.b, c.metric, c.mean, c.ci95, c.wilcoxon_p, c.n_users, c.n_positive)


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("diffs", "weights", "message"),
    [
        ([], None, "at least one item"),
        ([1.0, 2.0], [1.0], "shape"),
        ([[1.0, 2.0]], [[1.0, 1.0]], "1-D"),
        ([1.0, float("nan")], [1.0, 1.0], "diffs must be finite"),
        ([1.0, float("inf")], None, "diffs must be finite"),
        ([1.0, 2.0], [1.0, float("inf")], "weights must be finite"),
        ([1.0, 2.0], [1.0, -0.5], "non-negative"),
        ([1.0, 2.0], [0.0, 0.0], "positive sum"),
        (["a", "b"], None, "numeric"),
    ],
)
def test_user_items_rejects_bad_input(diffs: list, weights: list | None, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        UserItems(diffs, weights)
    assert "\n" not in str(error.value)


def test_user_items_are_frozen_copies() -> None:
    source = np.array([1.0, 2.0])
    user = UserItems(source, np.array([1.0, 1.0]))
    source[0] = 100.0
    assert user.mean == pytest.approx(1.5)
    with pytest.raises(ValueError):
        user.diffs[0] = 5.0


def test_zero_users_and_bad_bootstrap_arguments_raise() -> None:
    with pytest.raises(ValueError, match="no users"):
        compare("a", "b", "nll", [])
    with pytest.raises(ValueError, match="no users"):
        two_level_bootstrap([])
    with pytest.raises(ValueError, match="UserItems"):
        user_means([np.array([1.0])])  # type: ignore[list-item]
    users = make_users(3, 4, between_sd=0.1, within_sd=0.1)
    with pytest.raises(ValueError, match="n_boot"):
        two_level_bootstrap(users, n_boot=0)
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="level"):
            two_level_bootstrap(users, level=level)
