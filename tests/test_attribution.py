"""Causal token attribution: exactness of patching, batching, planted-marker recovery, errors."""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.attribution import (
    AttributionConfig,
    Span,
    TokenEffects,
    UserAttribution,
    aggregate_spans,
    attribute_user,
    counterfactual_contexts,
    layer_effects,
    merge_spans,
    prepare_items,
    select_tokens,
    token_effects,
)
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory, make_synthetic_users
from steerx_lens.models import load_demo_model, load_tiny_model
from steerx_lens.text import prompt_and_response

TOL = 1e-4
EXACT_SITES = ("hook_embed", "blocks.0.hook_resid_pre")
SHORT_ITEMS = [("Beer?", "Sour ales."), ("Sleep?", "Walk every day."), ("Brew?", "Patience.")]
TINY_CONTEXT = 256  # the tiny model's position limit (TransformerLens enforces n_ctx)


@pytest.fixture(scope="module")
def users() -> list[UserHistory]:
    return make_synthetic_users(n_users=4, n_history=4, n_heldout=1, seed=0)


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def demo() -> Any:
    return load_demo_model("hf")


def _batch(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids + mask, built independently of the module under test."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def assert_patch_equals_counterfactual_run(model: Any, users: list[UserHistory]) -> None:
    """Patching another user's same-length block at layer 0 == running that token sequence."""
    adapter = get_adapter(model)
    tokenizer = adapter.tokenizer
    sequences = prepare_items(tokenizer, users[0])[:2]
    clean_rows, cf_rows = [], []
    for seq in sequences:
        context = counterfactual_contexts(tokenizer, seq.context_len, "other_users", users[1:2])[0]
        clean_rows.append(seq.input_ids)
        cf_rows.append(seq.with_context(context).input_ids)
    assert cf_rows[0] != clean_rows[0]
    clean, cf = _batch(clean_rows, adapter.pad_token_id), _batch(cf_rows, adapter.pad_token_id)
    width = clean["input_ids"].shape[1]
    positions = torch.zeros(len(sequences), width, dtype=torch.bool)
    for b, seq in enumerate(sequences):
        offset = width - len(seq.input_ids)
        positions[b, offset + seq.context_start : offset + seq.context_stop] = True
    real = clean["attention_mask"].bool()
    reference, acts = hooks.cache(model, cf, list(EXACT_SITES))
    assert (hooks.run(model, clean) - reference)[real].abs().max() > 1e-2  # the context matters
    for site in EXACT_SITES:
        patched = hooks.run(model, clean, hooks.Patch(site, acts[site], positions=positions))
        assert (patched - reference)[real].abs().max() <= TOL, site


# ------------------------------------------------------------------------------- (1) exactness


def test_layer0_patch_is_the_counterfactual_run_tiny(tiny: Any, users: list[UserHistory]) -> None:
    assert_patch_equals_counterfactual_run(tiny, users)


@pytest.mark.demo
def test_layer0_patch_is_the_counterfactual_run_demo(demo: Any, users: list[UserHistory]) -> None:
    assert_patch_equals_counterfactual_run(demo, users)


def test_layer_zero_row_equals_default_effects(tiny: Any, users: list[UserHistory]) -> None:
    """The patched path (layer effects) at layer 0 equals the default (counterfactual-run) path."""
    default = token_effects(tiny, users[0], users)
    layered = layer_effects(tiny, users[0], users, layers=[0, 1])
    for full, rows in zip(default, layered, strict=True):
        assert rows.effects.shape == (2, len(full.tokens))
        assert (rows.effects[0] - full.effects).abs().max() <= TOL
        assert (rows.effects[1] - full.effects).abs().max() > 1e-3  # layer 1 only: a part


# ------------------------------------------------------------------------------- (2) batching


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"counterfactual": "mean"},
        {"counterfactual": "neutral"},
        {"sites": ["blocks.1.hook_resid_pre"]},
        {"method": "prompt"},
    ],
)
def test_batched_equals_unbatched(
    tiny: Any, users: list[UserHistory], options: dict[str, Any]
) -> None:
    batched = token_effects(tiny, users[1], users, AttributionConfig(batch_size=8, **options))
    single = token_effects(tiny, users[1], users, AttributionConfig(batch_size=1, **options))
    assert len(batched) == len(users[1].history)
    for a, b in zip(batched, single, strict=True):
        assert torch.equal(a.token_ids, b.token_ids)
        assert (a.effects - b.effects).abs().max() <= TOL
        assert (a.logp_user - b.logp_user).abs().max() <= TOL
    assert max(float(a.effects.abs().max()) for a in batched) > 1e-3  # not trivially zero


def test_prob_measure_is_a_probability_difference(tiny: Any, users: list[UserHistory]) -> None:
    probs = token_effects(
        tiny, users[1], config=AttributionConfig(counterfactual="neutral", measure="prob")
    )
    logps = token_effects(tiny, users[1], config=AttributionConfig(counterfactual="neutral"))
    for p, lp in zip(probs, logps, strict=True):
        expected = p.logp_user.exp() - p.logp_counterfactual.exp()  # one neutral context
        assert torch.allclose(p.effects, expected, atol=1e-7)
        assert torch.allclose(lp.effects, lp.logp_user - lp.logp_counterfactual)
        assert not torch.allclose(p.effects, lp.effects)


def test_transformer_lens_backend_matches_hf(tiny: Any, users: list[UserHistory]) -> None:
    tl = load_tiny_model("transformer_lens")
    short = [
        UserHistory(name, [HistoryItem(q, f"{a} {sign}") for q, a in SHORT_ITEMS])
        for name, sign in (("sam", "Cheers, Sam!"), ("kim", "Onward, Kim!"))
    ]
    fitted = prepare_items(get_adapter(tiny).tokenizer, short[0], TINY_CONTEXT)
    assert all(seq.context_len > 0 and seq.n_dropped == 0 for seq in fitted)
    for options in ({}, {"sites": ["blocks.1.hook_resid_pre"]}):
        config = AttributionConfig(max_context_tokens=TINY_CONTEXT, **options)
        reference = token_effects(tiny, short[0], short, config)
        got = token_effects(tl, short[0], short, config)
        for a, b in zip(reference, got, strict=True):
            assert (a.effects - b.effects).abs().max() <= TOL
            assert a.effects.abs().max() > 1e-3


def test_token_texts_rebuild_the_response(tiny: Any, users: list[UserHistory]) -> None:
    tokenizer = get_adapter(tiny).tokenizer
    for item in token_effects(tiny, users[0], users):
        prompt, full = prompt_and_response(tokenizer, users[0].history[item.item_index])
        assert "".join(item.tokens) == full[len(prompt) :]  # plain format: " " + output
        assert len(item.tokens) == item.effects.numel() == item.token_ids.numel()


# ------------------------------------------------------------------------------- (3) markers


def precision_at_k(attribution: UserAttribution, markers: list[str]) -> float:
    """Share of the top-k spans (k = number of markers) that match a marker."""
    k = len(markers)
    top = [span.text.casefold() for span in attribution.spans[:k]]
    folded = [m.casefold() for m in markers]
    return sum(any(s in m or m in s for m in folded) for s in top) / k


@pytest.fixture(scope="module")
def demo_attributions(demo: Any, users: list[UserHistory]) -> dict[str, UserAttribution]:
    out = {}
    for user in users:
        start = time.perf_counter()
        out[user.user_id] = attribute_user(demo, user, users)
        print(f"{user.user_id}: attribution {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.demo
def test_planted_markers_are_recovered(
    users: list[UserHistory], demo_attributions: dict[str, UserAttribution]
) -> None:
    scores = []
    for user in users:
        attribution = demo_attributions[user.user_id]
        scores.append(precision_at_k(attribution, user.meta["markers"]))
        print(user.user_id, user.meta["markers"], [s.text for s in attribution.spans[:4]])
    mean = sum(scores) / len(scores)
    print(f"precision@k over {len(users)} users: {mean:.3f}")
    assert mean >= 0.8


# ------------------------------------------------------------------------------- (4) errors


def test_empty_history_is_an_error(tiny: Any, users: list[UserHistory]) -> None:
    with pytest.raises(ValueError, match="empty history"):
        attribute_user(tiny, UserHistory("nobody", []), users)


def test_single_item_is_an_error(tiny: Any, users: list[UserHistory]) -> None:
    lonely = UserHistory("lonely", users[0].history[:1])
    with pytest.raises(ValueError, match="at least 2"):
        attribute_user(tiny, lonely, users)


def test_no_population_is_an_error_unless_neutral(tiny: Any, users: list[UserHistory]) -> None:
    with pytest.raises(ValueError, match="population"):
        attribute_user(tiny, users[0], [users[0]])
    neutral = token_effects(tiny, users[0], config=AttributionConfig(counterfactual="neutral"))
    assert len(neutral) == len(users[0].history)
    prompt = token_effects(tiny, users[0], config=AttributionConfig(method="prompt"))
    assert len(prompt) == len(users[0].history)


def test_long_items_drop_history_then_truncate(tiny: Any, users: list[UserHistory]) -> None:
    user = users[0]
    full = prepare_items(get_adapter(tiny).tokenizer, user)
    # A budget that fits each item with one other item (but not all three): oldest dropped.
    lengths = [len(s.input_ids) for s in full]
    budget = max(lengths) - 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = token_effects(tiny, user, users, AttributionConfig(max_context_tokens=budget))
    dropped = [w for w in caught if "dropped the oldest" in str(w.message)]
    assert len(dropped) == 1
    sequences = prepare_items(get_adapter(tiny).tokenizer, user, budget)
    assert any(s.n_dropped > 0 for s in sequences)
    assert all(len(s.input_ids) <= budget for s in sequences)
    assert len(fitted) == len(user.history)

    # A budget below prompt + response without any history: the response is cut.
    long_item = HistoryItem("Tell me.", " ".join(["Cheers, Sam!"] * 40))
    user_long = UserHistory("long", [long_item, user.history[1]])
    budget = 60
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        effects = token_effects(
            tiny, user_long, users, AttributionConfig(max_context_tokens=budget)
        )
    messages = " | ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "dropped the oldest" in messages
    seq = prepare_items(get_adapter(tiny).tokenizer, user_long, budget)[0]
    assert seq.truncated and seq.context_len == 0 and len(seq.input_ids) == budget
    assert effects[0].effects.numel() == budget - seq.response_start
    assert effects[0].effects.abs().max() == 0  # no history fits: no effect

    with pytest.raises(ValueError, match="prompt alone"):
        token_effects(tiny, user_long, users, AttributionConfig(max_context_tokens=3))


def test_bad_options_are_errors(tiny: Any, users: list[UserHistory]) -> None:
    with pytest.raises(ValueError, match="counterfactual"):
        AttributionConfig(counterfactual="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sites"):
        AttributionConfig(method="prompt", sites=["hook_embed"])
    with pytest.raises(ValueError, match="selection rule"):
        AttributionConfig(rule="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        AttributionConfig(batch_size=0)
    with pytest.raises(KeyError, match="out of range"):
        token_effects(tiny, users[0], users, AttributionConfig(sites=["blocks.9.hook_resid_pre"]))


# ------------------------------------------------------------------------------- (5) pure rules


def test_select_tokens_rules() -> None:
    effects = torch.tensor([0.1, 12.0, -3.0, 1.5, 0.2, 0.9])
    assert select_tokens(effects, "threshold", threshold=1.0).tolist() == [
        False,
        True,
        False,
        True,
        False,
        False,
    ]
    assert select_tokens(effects, "topk", k=2).nonzero().flatten().tolist() == [1, 3]
    assert select_tokens(torch.tensor([-1.0, -2.0]), "topk", k=2).sum() == 0  # positives only
    assert select_tokens(effects, "zscore", z=1.5).nonzero().flatten().tolist() == [1]
    with pytest.raises(ValueError, match="rule"):
        select_tokens(effects, "best")  # type: ignore[arg-type]


def test_merge_spans_extends_subwords_and_merges_neighbours() -> None:
    tokens = ["Good", " luck", ".", " On", "ward", ",", " Kim", "!", " #", "tip"]
    effects = torch.tensor([0.0, 0.0, 0.0, 12.0, 0.1, 0.0, 3.0, 0.0, 2.0, 0.5])
    selected = effects > 1.0
    spans = merge_spans(tokens, effects, selected)
    # "On" extends to "Onward"; "Onward" and "Kim" are not adjacent words ("," between).
    assert [text for text, _ in spans] == ["Onward", "Kim", "#tip"]
    assert spans[0][1] == pytest.approx(12.1)  # both pieces of the word count
    selected[5] = True  # now "Onward , Kim" is one run of words
    assert [t for t, _ in merge_spans(tokens, effects, selected)][0] == "Onward, Kim"


def test_merge_spans_stops_at_sentence_ends_and_handles_split_characters() -> None:
    tokens = ["Take", " care", ".", " 🍀", "", "", " #", "bonus"]
    effects = torch.tensor([2.0, 2.0, 2.0, 5.0, 0.1, 0.1, 2.0, 2.0])
    spans = merge_spans(tokens, effects, torch.ones(len(tokens), dtype=torch.bool))
    assert [t for t, _ in spans] == ["Take care.", "🍀", "#bonus"]
    only_emoji = torch.tensor([False, False, False, True, False, False, False, False])
    emoji_spans = merge_spans(tokens, effects, only_emoji)
    assert emoji_spans == [("🍀", pytest.approx(5.2))]  # continuation pieces belong to it


def _item(index: int, tokens: list[str], effects: list[float]) -> TokenEffects:
    values = torch.tensor(effects)
    return TokenEffects("u", index, tokens, torch.arange(len(tokens)), values, values, values * 0)


def test_aggregate_spans_ranks_by_frequency_times_mean_effect() -> None:
    items = [
        _item(0, ["The", " cat", ".", " Cheers", ",", " Sam", "!"], [3, 0, 0, 10, 0, 0, 0]),
        _item(1, ["A", " dog", ".", " Cheers", ",", " Sam", "!"], [0, 4, 0, 8, 0, 0, 0]),
        _item(2, ["A", " cat", ".", " cheers"], [0, 2, 0, 6]),
    ]
    spans = aggregate_spans(items)
    assert [s.text for s in spans] == ["Cheers", "dog", "cat"]  # "The" is a stop-word
    assert spans[0] == Span("Cheers", pytest.approx((10 + 8 + 6) / 3), 3)
    assert spans[1].score == pytest.approx(4 / 3) and spans[2].count == 1
    keep_the = aggregate_spans(items, AttributionConfig(stopwords=frozenset()))
    assert "The" in [s.text for s in keep_the]
    top1 = aggregate_spans(items, AttributionConfig(rule="topk", top_k=1))
    assert [s.text for s in top1] == ["Cheers"]


# ------------------------------------------------------------------------------- (6) methods


def _signoff_token(item: TokenEffects, output: str, marker: str) -> int:
    """Index of the token where the planted sign-off starts."""
    start = output.index(marker)
    position = 0
    for index, token in enumerate(item.tokens):
        if position + len(token) > start and token.strip():
            return index
        position += len(token)
    raise AssertionError("sign-off not found")


@pytest.mark.demo
def test_prompt_and_patch_agree_on_the_signoff(
    demo: Any, users: list[UserHistory], demo_attributions: dict[str, UserAttribution]
) -> None:
    user = next(u for u in users if "signoff" in u.meta["marker_kinds"])
    marker = user.meta["markers"][user.meta["marker_kinds"].index("signoff")]
    patch = demo_attributions[user.user_id].items
    prompt = token_effects(demo, user, users, AttributionConfig(method="prompt"))
    checked = 0
    for a, b in zip(patch, prompt, strict=True):
        output = user.history[a.item_index].output
        if marker not in output:
            continue
        assert torch.equal(a.token_ids, b.token_ids)
        index = _signoff_token(a, output, marker)
        assert a.effects[index] > 1.0 and b.effects[index] > 1.0, (a.tokens[index], marker)
        checked += 1
    assert checked > 0


def test_heldout_targets_use_the_whole_history_and_report_counterfactual_top(tiny: Any) -> None:
    users = make_synthetic_users(n_users=3, n_history=3, n_heldout=2, seed=1)
    user = users[0]
    effects = token_effects(tiny, user, users, targets=user.heldout)
    assert [e.item_index for e in effects] == [0, 1]
    for item, target in zip(effects, user.heldout, strict=True):
        assert "".join(item.tokens).strip() == target.output.strip()
        assert item.counterfactual_top is not None
        assert item.counterfactual_top.shape == item.token_ids.shape
    one_item = UserHistory("solo", user.history[:1], user.heldout)
    assert len(token_effects(tiny, one_item, users, targets=user.heldout[:1])) == 1
