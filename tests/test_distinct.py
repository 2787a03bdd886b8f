"""The ``nll_distinct`` terms: Monroe et al.'s log-odds z on a toy corpus, spans, token masks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.evaluation.distinct import (
    distinct_char_spans,
    distinctive_terms,
    heldout_distinct_spans,
    log_odds_z,
    token_mask_from_spans,
    tokenize,
)
from steerx_lens.models import build_tiny_model_dir

# "zebra" is A's alone, "bird" C's; "#yay" and "!!!" are B's style; "the" and "cat" are shared.
TOY = {
    "A": ["the zebra ran", "the zebra sat", "a zebra cat", "zebra zebra cat", "the zebra sang"],
    "B": ["the dog ran #yay !!!", "the cat sat !!! #yay", "a dog #yay !!!", "dog !!! #yay !!!"],
    "C": ["the bird ran", "the cat flew", "a bird sang", "bird bird sang", "the bird sat"],
}


def test_tokenizer_keeps_style_tokens_apart() -> None:
    tokens = tokenize("RT @bbc: U.S. flu jabs!!! 😷 #Health don't… see https://t.co/x")
    assert [t.text for t in tokens] == [
        "rt", "@bbc", ":", "u.s.", "flu", "jabs", "!!!", "😷", "#health", "don't", "…", "see",
        "https://t.co/x",
    ]  # fmt: skip
    assert (tokens[1].start, tokens[1].end, tokens[3].start, tokens[3].end) == (3, 7, 9, 13)


def test_word_of_one_user_is_distinctive_for_that_user_only() -> None:
    terms = distinctive_terms(TOY)
    assert "zebra" in terms["A"] and terms["A"]["zebra"] > 1.96
    assert "zebra" not in terms["B"] and "zebra" not in terms["C"]
    assert {"#yay", "!!!"} <= set(distinctive_terms(TOY, z=1.5)["B"])
    z = log_odds_z(TOY)
    assert z["B"]["zebra"] < 0 and z["C"]["zebra"] < 0


def test_word_everyone_uses_equally_is_distinctive_for_nobody() -> None:
    equal = {u: ["the cat and the hat"] * 3 + [f"{u}x {u}x {u}x"] for u in "ABC"}
    z = log_odds_z(equal)
    for user in "ABC":
        assert z[user]["the"] == pytest.approx(0.0, abs=1e-12)
        assert z[user]["cat"] == pytest.approx(0.0, abs=1e-12)
        assert "the" not in distinctive_terms(equal, z=0.0)[user]


def test_twice_as_often_has_the_sign_and_value_of_monroes_formula() -> None:
    # "apple" is A's word twice as often as each other user's; every user has 4 tokens.
    toy = {
        "A": ["apple apple pear kiwi"],
        "B": ["apple pear pear kiwi"],
        "C": ["apple pear kiwi kiwi"],
    }
    z = log_odds_z(toy, ngram=(1, 1), prior_strength=1.0)
    # prior a_w = pooled count = 4 for every word, a_0 = 12; n_A = 4, others n_j = 8.
    # A: y_i = 2, y_j = 2: delta = log(6 / (4+12-2-4)) - log(6 / (8+12-2-4)), var = 1/6 + 1/6
    expected_a = (math.log(6 / 10) - math.log(6 / 14)) / math.sqrt(1 / 6 + 1 / 6)
    # B: y_i = 1, y_j = 3: delta = log(5 / (4+12-1-4)) - log(7 / (8+12-3-4)), var = 1/5 + 1/7
    expected_b = (math.log(5 / 11) - math.log(7 / 13)) / math.sqrt(1 / 5 + 1 / 7)
    assert z["A"]["apple"] == pytest.approx(expected_a, rel=1e-12) and expected_a > 0
    assert z["B"]["apple"] == pytest.approx(expected_b, rel=1e-12) and expected_b < 0
    assert z["C"]["apple"] == pytest.approx(expected_b, rel=1e-12)
    assert round(expected_a, 4) == 0.5828 and round(expected_b, 4) == -0.2893
    # the default prior strength 0.1: a_w = 0.4, a_0 = 1.2
    weak = log_odds_z(toy, ngram=(1, 1))["A"]["apple"]
    expected = (math.log(2.4 / 2.8) - math.log(2.4 / 6.8)) / math.sqrt(2 / 2.4)
    assert weak == pytest.approx(expected, rel=1e-12) and weak > expected_a


def test_prior_strength_and_min_count_and_bigrams() -> None:
    strong = log_odds_z(TOY, prior_strength=1.0)
    assert strong["A"]["zebra"] != log_odds_z(TOY)["A"]["zebra"]
    assert "zebra" in distinctive_terms(TOY, min_count=6)["A"]  # A writes it 6 times
    assert "zebra" not in distinctive_terms(TOY, min_count=7)["A"]
    assert "the zebra" in log_odds_z(TOY)["A"] and "zebra" not in log_odds_z(TOY, ngram=(2, 2))["A"]
    for bad in ({"ngram": (0, 1)}, {"ngram": (2, 1)}, {"prior_strength": 0.0}):
        with pytest.raises(ValueError):
            log_odds_z(TOY, **bad)
    with pytest.raises(ValueError, match="at least 2 users"):
        distinctive_terms({"A": TOY["A"]})
    with pytest.raises(ValueError, match="min_count"):
        distinctive_terms(TOY, min_count=0)


def test_invariant_to_user_order() -> None:
    reordered = {u: TOY[u] for u in ("C", "A", "B")}
    assert log_odds_z(reordered) == log_odds_z(TOY)
    assert distinctive_terms(reordered) == distinctive_terms(TOY)


def test_spans_cover_terms_and_heldout_texts_do_not_change_terms() -> None:
    terms = distinctive_terms(TOY)
    before = copy.deepcopy(terms)
    text = "A Zebra, the zebra ran! #yay zebra"
    spans = distinct_char_spans(text, terms["A"])
    assert [text[a:b] for a, b in spans] == ["Zebra", "zebra", "zebra"]
    assert distinct_char_spans(text, {"#yay", "!!!"}) == [(24, 28)]
    assert terms == before
    assert distinct_char_spans(text, {"zebra", "the zebra", "zebra ran"}) == [
        (2, 7),
        (9, 22),
        (29, 34),
    ]

    def users(heldout: str) -> list[UserHistory]:
        """The toy users, each holding out ``heldout`` then "zebra #yay"."""
        last = HistoryItem("", "zebra #yay")
        return [
            UserHistory(u, [HistoryItem("", t) for t in texts], [HistoryItem("", heldout), last])
            for u, texts in TOY.items()
        ]

    first = heldout_distinct_spans(users("zebra zebra zebra #yay #yay"), z=1.5)
    second = heldout_distinct_spans(users("#yay !!! #yay"), z=1.5)
    assert all(first[u][1] == second[u][1] for u in TOY)  # other held-out texts: no effect
    assert (first["A"][1], first["B"][1], first["C"][1]) == ([(0, 5)], [(6, 10)], [])
    with pytest.raises(ValueError, match="duplicate user ids"):
        heldout_distinct_spans(users("x")[:1] * 2)


def test_token_mask_marks_exactly_the_overlapping_tokens() -> None:
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model_dir())
    text = "Our zebra report: the zebra ran fast, #yay!!! and nothing else."
    spans = distinct_char_spans(text, {"zebra", "#yay", "!!!"})
    assert [text[a:b] for a, b in spans] == ["zebra", "zebra", "#yay!!!"]
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    mask = token_mask_from_spans(offsets, spans)
    covered = {c for a, b in spans for c in range(a, b)}
    expected = [bool(covered & set(range(s, e))) for s, e in offsets]
    assert mask.dtype == np.bool_ and mask.tolist() == expected and 0 < mask.sum() < len(offsets)
    picked = tokenizer.decode([t for t, m in zip(enc["input_ids"], mask, strict=True) if m])
    assert "zebra" in picked and "#yay" in picked.replace(" ", "")
    assert "report" not in picked and "nothing" not in picked
    assert not token_mask_from_spans(offsets, []).any()
    assert token_mask_from_spans([(0, 0), (0, 3)], [(0, 2)]).tolist() == [False, True]
