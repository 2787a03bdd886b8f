"""Metrics on hand-checked cases, the eval run's schema, resume, and sweeps' data hygiene."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from json_numbers import assert_same_numbers
from steerx_lens import hooks
from steerx_lens.attribution import Span
from steerx_lens.attribution.effects import counterfactual_users
from steerx_lens.backends import get_adapter
from steerx_lens.data import UserHistory, fit_split, make_synthetic_users
from steerx_lens.evaluation.cells import (
    R_METHODS,
    STEERED_METHODS,
    Cell,
    check_alpha_candidates,
    choose_alpha,
    read_cells,
)
from steerx_lens.evaluation.experiment import (
    GOAL_FAMILY,
    Experiment,
    _item_values,
    confirmatory,
    paired_users,
)
from steerx_lens.evaluation.masks import distinct_spans, planted_spans, span_masks
from steerx_lens.evaluation.metrics import (
    ALL_METHODS,
    encode_for_eval,
    generation_scores,
    token_nll,
)
from steerx_lens.evaluation.results import ItemValues, UserRecord
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import SteerX, SteerXConfig, decomposed_baseline
from steerx_lens.sweep import parse_layers, run_sweep

CONFIG = SteerXConfig(layer=1, answer_tokens=4, max_context_tokens=256)


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def users() -> list[UserHistory]:
    return make_synthetic_users(n_users=3, n_history=4, n_heldout=1, seed=2)


def test_generation_scores_on_hand_checked_cases() -> None:
    perfect = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect.as_dict() == {"rouge1": 100.0, "rougeL": 100.0, "bleu": pytest.approx(100.0)}
    half = generation_scores(["the cat"], ["the dog"])
    assert half.rouge1 == pytest.approx(50.0) and half.rougeL == pytest.approx(50.0)
    assert generation_scores(["xyz"], ["the dog"]).rouge1 == 0.0


def test_token_nll_matches_a_manual_computation(tiny: Any, users: list) -> None:
    tokenizer = get_adapter(tiny).tokenizer
    items = [users[0].heldout[0], users[1].history[0]]
    texts = [encode_for_eval(tokenizer, item) for item in items]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    from steerx_lens.vectors import SteeringVector

    steering = SteeringVector(
        vector, "blocks.1.hook_resid_post", get_adapter(tiny).fingerprint(), alpha=2.0
    )
    batched = token_nll(tiny, texts, [steering, None])
    for text, got, vec in zip(texts, batched, [steering, None], strict=True):
        ids = torch.tensor([text.input_ids])
        interventions = (
            [] if vec is None else [vec.to_steer(positions=slice(text.response_start - 1, None))]
        )
        logits = hooks.run(tiny, ids, *interventions)
        logp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(got, -logp[text.response_start - 1 :], atol=1e-4)


def test_token_nll_runs_the_blocks_below_the_site_once_per_text(
    tiny: Any, users: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Texts scored under several vectors of one layer share the blocks below it: the same
    values as full passes, with block 0 run for 3 distinct texts, not for 12 rows (a text
    scored once takes a full pass)."""
    from steerx_lens.vectors import SteeringVector

    adapter = get_adapter(tiny)
    items = [users[0].heldout[0], users[1].history[0], users[0].history[1]]
    texts = [encode_for_eval(adapter.tokenizer, item) for item in items]
    assert len({tuple(t.input_ids) for t in texts}) == 3
    vectors = [None] + [
        SteeringVector(
            torch.randn(64, generator=torch.Generator().manual_seed(seed)),
            "blocks.1.hook_resid_post",
            adapter.fingerprint(),
            alpha=2.0,
        )
        for seed in range(3)
    ]
    once = encode_for_eval(adapter.tokenizer, users[1].history[1])  # scored once: a full pass
    rows = [(text, vector) for text in texts for vector in vectors] + [(once, vectors[1])]
    block0_rows: list[int] = []
    handle = adapter.layers[0].register_forward_hook(
        lambda _m, args, _o: block0_rows.append(args[0].shape[0])
    )
    try:
        shared = token_nll(tiny, [t for t, _ in rows], [v for _, v in rows], batch_size=4)
        assert sum(block0_rows) == 3 + 1
        block0_rows.clear()
        monkeypatch.setattr(adapter, "can_start_mid_stack", False)
        full = token_nll(tiny, [t for t, _ in rows], [v for _, v in rows], batch_size=4)
        assert sum(block0_rows) == 12 + 1
    finally:
        handle.remove()
    for got, expected in zip(shared, full, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(shared[0], shared[1], atol=1e-3), "the vectors change the NLL"


def test_eval_writes_the_documented_schema_and_resumes(
    tiny: Any, users: list, tmp_path: Path
) -> None:
    options = {"max_new_tokens": 4, "progress": False, "users_per_batch": 2}  # groups of 2 and 1
    metrics = Experiment(tiny, users, tmp_path, CONFIG, **options).run()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert list(on_disk)[:5] == ["config", "primary", "methods", "comparisons", "generation_check"]
    assert set(on_disk["methods"]) == set(ALL_METHODS)
    for method in ALL_METHODS:
        values = on_disk["methods"][method]
        assert {"nll", "nll_distinct", "nll_marker", "nll_pref", "rougeL", "bleu"} <= set(values)
        assert math.isfinite(values["nll"]) and values["n_users_nll"] == len(users)
        assert values["n_users_nll_marker"] == len(users)  # synthetic users: planted markers
    for method in STEERED_METHODS:
        assert on_disk["methods"][method]["steering_norm"] > 0
    primary = on_disk["primary"]
    assert set(primary) == {"a", "b", "metric", "mean", "ci95", "wilcoxon_p", "p_holm", "n_users"}
    assert (primary["a"], primary["b"], primary["metric"]) == ("steerx", "baseline", "nll")
    assert primary["ci95"][0] <= primary["mean"] <= primary["ci95"][1]
    assert primary["n_users"] == len(users)
    for comparison in on_disk["comparisons"]:
        assert "p_holm" in comparison
        if comparison["wilcoxon_p"] is not None:
            assert comparison["wilcoxon_p"] <= comparison["p_holm"] <= 1.0
    goal = on_disk["goal"]
    compared_keys = {(c["a"], c["b"], c["metric"]) for c in on_disk["comparisons"]}
    assert [(c["a"], c["b"], c["metric"]) for c in goal] == [
        key for key in GOAL_FAMILY if key in compared_keys
    ]
    assert {("steerx", "baseline", "nll"), ("steerx", "baseline", "rougeL")} <= compared_keys
    for c in goal:  # the six alone are adjusted less than within all ~70
        if c["wilcoxon_p"] is not None:
            assert c["wilcoxon_p"] <= c["p_holm_goal"] <= c["p_holm"]
    assert "## The goal's comparisons" in (tmp_path / "report.md").read_text()
    compared = {(c["a"], c["b"]) for c in on_disk["comparisons"]}
    assert {("steerx", "decomposed_baseline"), ("steerx", "random_swap")} <= compared
    assert {("description_prompt", "none"), ("steerx", "steerx_other")} <= compared
    check = on_disk["generation_check"]
    assert check["informative"] in (True, False)
    history_row = next(
        c
        for c in on_disk["comparisons"]
        if (c["a"], c["b"], c["metric"]) == ("history_prompt", "none", "rougeL")
    )
    assert check["paired"] == {
        k: history_row[k] for k in ("mean", "n_positive", "n_users", "wilcoxon_p")
    }
    assert check["significant"] in (True, False)
    assert f"ahead for {history_row['n_positive']} of {history_row['n_users']}" in check["message"]
    # per-user steerx NLL is the token-weighted mean of its items
    record = on_disk["per_user"][0]
    items = record["items"]["steerx"]["nll"]
    pooled = sum(v * w for v, w in zip(items["values"], items["weights"], strict=True))
    assert record["scores"]["steerx"]["nll"] == pytest.approx(pooled / sum(items["weights"]))
    assert [u["user_id"] for u in on_disk["per_user"]] == [u.user_id for u in users]
    assert (tmp_path / "report.md").read_text().startswith("# SteerX evaluation report")
    assert "## Primary comparison" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "methods.png").exists() and (tmp_path / "margins.png").exists()
    assert metrics.to_json() == on_disk
    first_run = (tmp_path / "metrics.json").read_bytes()

    files = sorted((tmp_path / "users").iterdir())
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    files[0].unlink()  # as if the run had been interrupted before this user finished
    Experiment(tiny, users, tmp_path, CONFIG, **options).run()
    for f in sorted((tmp_path / "users").iterdir()):
        if f.name == files[0].name:
            assert f.exists()
        else:
            assert f.stat().st_mtime_ns == stamps[f.name], "a finished user was recomputed"
    # resumed users are read back into typed records and written out unchanged; the re-run
    # user's rows share forward batches with other users' rows in the first run only, so its
    # float32 values may differ in the last bits (padding changes the kernels' shapes)
    assert_same_numbers(json.loads((tmp_path / "metrics.json").read_bytes()), json.loads(first_run))


def test_confirmatory_holm_counts_only_the_goal_family() -> None:
    def entry(a: str, b: str, metric: str, p: float | None) -> dict:
        return {"a": a, "b": b, "metric": metric, "wilcoxon_p": p}

    comparisons = [
        entry("history_prompt", "none", "nll", 0.0001),  # exploratory: not in the family
        entry("steerx", "random_swap", "nll", 0.004),
        entry("steerx", "baseline", "nll", 0.01),
        entry("steerx", "baseline", "rougeL", None),
        entry("steerx", "none", "nll", 0.02),
    ]
    goal = confirmatory(comparisons)
    assert [(c["a"], c["b"], c["metric"]) for c in goal] == [
        ("steerx", "baseline", "nll"),
        ("steerx", "baseline", "rougeL"),
        ("steerx", "none", "nll"),
        ("steerx", "random_swap", "nll"),
    ]
    # three testable p's: 0.004 * 3, then max(0.012, 0.01 * 2), then max(0.02, 0.02 * 1)
    assert [c["p_holm_goal"] for c in goal] == pytest.approx([0.02, None, 0.02, 0.012])
    assert goal[0]["wilcoxon_p"] == 0.01  # the entry itself is kept


def test_user_records_round_trip_through_json() -> None:
    record = UserRecord(
        user_id="u",
        config_key="key",
        n_heldout_tokens=10,
        mask_tokens={"nll_distinct": 2, "nll_pref": 0},
        description=None,
        top_spans=[Span(" Cheers", 1.5, 2)],
        n_swapped_tokens=3,
        steerx_fallback=False,
        items={
            "none": {"nll": ItemValues([2.0, 4.0], [3, 1]), "rougeL": ItemValues([40.0], [1])},
            "steerx_other": {"nll_distinct": ItemValues([None, 1.0], [0, 2])},
        },
        steering_norm={"steerx": 0.2},
        generations={"none": ["hello"]},
    )
    data = json.loads(json.dumps(record.to_json()))
    assert data["scores"] == {
        "none": {"nll": 2.5, "rougeL": 40.0},
        "steerx_other": {"nll_distinct": 1.0},
    }
    assert data["top_spans"] == [{"text": " Cheers", "score": 1.5, "count": 2}]
    assert UserRecord.from_json(data) == record


def test_each_method_gets_its_own_best_cell_and_a_sign_flip_check(
    tiny: Any, tmp_path: Path
) -> None:
    users = make_synthetic_users(n_users=3, n_history=5, n_heldout=1, seed=3)
    result = run_sweep(
        tiny, users, [0, 1], [-1.0, 1.0, 4.0], tmp_path, CONFIG, rs=(0.1, 0.3), progress=False
    )
    best = json.loads((tmp_path / "best.json").read_text())["methods"]
    assert set(best) == set(STEERED_METHODS)
    for method, cell in best.items():
        grid = np.asarray(result["nll_change"][method])
        assert cell["validation_nll_change"] == pytest.approx(float(np.nanmin(grid)))
        r_index = result["rs"].index(cell["r"]) if "r" in cell else 0
        layer_index = result["layers"].index(cell["layer"])
        alpha_index = result["alphas"].index(cell["alpha"])
        assert grid[r_index, layer_index, alpha_index] == pytest.approx(
            cell["validation_nll_change"]
        )
        assert ("r" in cell) == (method in R_METHODS)
        flip = result["sign_flip"][method]
        assert flip["alpha"] == -cell["alpha"]
        assert flip["passed"] == (flip["validation_nll_change"] > cell["validation_nll_change"])
        assert cell["relative_strength"] > 0
    cells = read_cells(tmp_path / "best.json", {})
    assert {m: c.layer for m, c in cells.items()} == {m: c["layer"] for m, c in best.items()}
    assert os.path.exists(tmp_path / "heatmap_steerx.png")


def test_eval_applies_each_methods_own_cell(tiny: Any, users: list, tmp_path: Path) -> None:
    cells = {"baseline": Cell(0, 2.0), "steerx": Cell(1, 0.5, 0.3)}
    experiment = Experiment(
        tiny, users, tmp_path, CONFIG, generate=False, progress=False, cells=cells
    )
    fits = experiment.fit()
    assert sorted(fits) == [0, 1]
    uid = experiment.users[0].user_id
    baseline = experiment.method_vector(uid, "baseline", fits)
    steerx = experiment.method_vector(uid, "steerx", fits)
    assert (baseline.site, baseline.alpha) == ("blocks.0.hook_resid_post", 2.0)
    assert (steerx.site, steerx.alpha) == ("blocks.1.hook_resid_post", 0.5)
    shared = experiment.method_vector(uid, "shared", fits)
    assert shared.site == "blocks.1.hook_resid_post"  # not named: the config's cell
    fitted = fits[1].users[uid]
    assert fitted.personal_direction is not None  # the default needs no description
    personal = steerx.vector - fitted.baseline.vector  # the default anchor: the baseline
    weight = float(fitted.personal_direction.norm())  # the split-half reliability w
    expected = 0.3 * fits[1].population.residual_norm * weight
    assert weight > 0 and float(personal.norm()) == pytest.approx(expected, rel=1e-4)


def test_no_heldout_or_validation_item_reaches_fitting_sweeping_masks_or_descriptions(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = make_synthetic_users(n_users=3, n_history=6, n_heldout=2, seed=3)
    for user in users:  # a sentinel word only held-out / validation items contain
        for item in user.heldout:
            item.output += " zebraheld"
        for item in user.history[-2:]:
            item.output += " quokkaval"
    tokenizer = get_adapter(tiny).tokenizer
    seen: list[str] = []
    adapter_class = type(get_adapter(tiny))
    original_encode = adapter_class.encode

    def spying_encode(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        batch = original_encode(self, inputs, *args, **kwargs)  # every model call encodes
        seen.extend(tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True))
        return batch

    monkeypatch.setattr(adapter_class, "encode", spying_encode)
    run_sweep(tiny, users, [1], [1.0], tmp_path / "sweep", CONFIG, rs=(0.1,), progress=False)
    assert seen, "the spy saw no forward passes"
    assert not any("zebraheld" in text for text in seen), "the sweep read a held-out item"
    seen.clear()
    experiment = Experiment(
        tiny, users, tmp_path / "eval", CONFIG, progress=False, alphas=(0.0, 1.0)
    )
    fits = experiment.fit()
    spans = distinct_spans(experiment.users)
    assert seen
    assert not any("zebraheld" in t or "quokkaval" in t for t in seen), "fit read held-out"
    seen.clear()
    experiment.choose_strengths()  # the fit above is memoised
    assert any("quokkaval" in t for t in seen), "strengths were not chosen on validation items"
    assert not any("zebraheld" in t for t in seen), "the strength choice read a held-out item"
    for fit in fits.values():
        for fitted in fit.users.values():
            assert "zebraheld" not in (fitted.description or "")
            assert "quokkaval" not in (fitted.description or "")
    # the distinctive terms come from fit items only: the sentinels are in no mask
    for user in experiment.users:
        for item, item_spans in zip(user.heldout, spans[user.user_id], strict=True):
            assert all("zebraheld" not in item.output[a:b] for a, b in item_spans)


def test_the_shared_vector_of_a_user_holds_no_trace_of_its_baseline(tiny: Any, users: list) -> None:
    pipeline = SteerX(tiny, replace(CONFIG, anchor="shared", strength="fixed"), progress=False)
    population = pipeline.build_population(users)
    first, second = users[0].user_id, users[1].user_id
    before = population.shared_for(first).vector.clone()
    expected = torch.stack(
        [v.vector for uid, v in population.baselines.items() if uid != first]
    ).mean(0)
    assert torch.allclose(before, expected, atol=1e-6)
    population.baselines[first] = population.baselines[first] * 100.0  # change u's baseline
    assert torch.equal(population.shared_for(first).vector, before)
    assert not torch.allclose(population.shared_for(second).vector, before)
    fitted = pipeline.fit_many(users)
    for uid, user_fit in fitted.users.items():
        shared = fitted.population.shared_for(uid).vector
        direction = user_fit.personal_direction
        personal = user_fit.steerx.vector - shared
        if direction is None:
            assert torch.allclose(personal, torch.zeros_like(personal))
        else:
            assert torch.allclose(personal / personal.norm(), direction, atol=1e-4)


def test_counterfactual_users_are_drawn_per_user_and_not_by_population_order() -> None:
    population = make_synthetic_users(n_users=10, n_history=2, n_heldout=0, seed=1)
    draws = {
        user.user_id: tuple(u.user_id for u in counterfactual_users(user, population, 2, 0))
        for user in population
    }
    assert len(set(draws.values())) >= 6  # 10 users, C(9, 2) = 36 possible pairs
    for user in population:
        assert user.user_id not in draws[user.user_id]
        shuffled = list(reversed(population))
        again = tuple(u.user_id for u in counterfactual_users(user, shuffled, 2, 0))
        assert again == draws[user.user_id]


def test_decomposed_baseline_has_steerx_strength_along_the_baseline() -> None:
    generator = torch.Generator().manual_seed(0)
    baseline, shared = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    control = decomposed_baseline(baseline, shared, 1.5)
    personal = control - shared
    assert float(personal.norm()) == pytest.approx(1.5, rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(personal, baseline - shared, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(decomposed_baseline(baseline, shared, 0.0), shared)


def test_random_swap_pairs_swap_as_many_tokens_at_other_positions(tiny: Any, users: list) -> None:
    pipeline = SteerX(tiny, replace(CONFIG, swap_threshold=0.0), progress=False)
    population = pipeline.build_population(users)
    evidence = pipeline.evidence(users[0], population)
    causal, random_pairs = evidence.pairs, pipeline.random_swap_pairs(evidence)
    assert causal.n_swapped_tokens > 0
    assert random_pairs.n_swapped_tokens == causal.n_swapped_tokens
    moved = 0
    for (original, twin), (_, random_twin) in zip(
        zip(causal.originals, causal.twins, strict=True),
        zip(random_pairs.originals, random_pairs.twins, strict=True),
        strict=True,
    ):
        ids = torch.tensor(original.tokens.input_ids)
        swapped = ids != torch.tensor(twin.tokens.input_ids)
        randomly = ids != torch.tensor(random_twin.tokens.input_ids)
        assert int(swapped.sum()) == int(randomly.sum())
        moved += int((swapped != randomly).any())
    assert moved > 0, "the random positions are the causal ones"
    assert pipeline.random_swap_pairs(evidence) == random_pairs  # seeded


def test_span_masks_cover_planted_markers_and_are_pure_functions_of_text(tiny: Any) -> None:
    users = make_synthetic_users(n_users=3, n_history=6, n_heldout=2, seed=4)
    tokenizer = get_adapter(tiny).tokenizer
    user = users[0]
    texts = [encode_for_eval(tokenizer, item) for item in user.heldout]
    planted = planted_spans(user)
    assert planted is not None
    masks = span_masks(tokenizer, texts, user, planted)
    for item, text, mask in zip(user.heldout, texts, masks, strict=True):
        chosen = tokenizer.decode(
            [t for t, m in zip(text.response_ids, mask.tolist(), strict=True) if m]
        )
        for span in item.meta["spans"]:
            word = "".join(c for c in span["marker"] if c.isalpha())[:3]
            assert (word or "\ufffd") in chosen or span["marker"] in chosen
        assert int(mask.sum()) < mask.numel()  # the template sentences are not markers
    spans = distinct_spans(users)
    edited = [
        replace(u, heldout=[replace(i, output=i.output + " extra") for i in u.heldout])
        for u in users
    ]
    again = distinct_spans(edited)
    for uid in spans:  # appending text to held-out items does not change earlier spans
        for before, after in zip(spans[uid], again[uid], strict=True):
            assert after[: len(before)] == before


def test_parse_layers() -> None:
    assert parse_layers("4:24:4") == [4, 8, 12, 16, 20]
    assert parse_layers("8,12") == [8, 12]


def test_masks_shorter_than_the_item_cover_its_first_tokens() -> None:
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert _item_values([nll], None).pooled() == 2.5
    assert _item_values([nll], [torch.tensor([False, True])]).pooled() == 2.0
    empty = _item_values([nll], [torch.tensor([False, False])])
    assert empty.values == [None] and empty.pooled() is None


def test_float_rounding_between_equal_methods_is_a_tie_not_evidence() -> None:
    def record(uid: str, a: list[float], b: list[float]) -> UserRecord:
        items = {"a": {"nll": ItemValues(a, [3] * len(a))}, "b": {"nll": ItemValues(b, [3] * 2)}}
        return UserRecord(uid, "k", 6, {}, None, [], 0, False, items, {})

    rounding = [record(u, [4.0, 3.5], [4.0 * (1 + 3e-7), 3.5 * (1 - 2e-7)]) for u in "xyz"]
    for user in paired_users(rounding, "a", "b", "nll"):
        assert user.diffs.tolist() == [0.0, 0.0]  # batch-shape rounding: ties
    real = [record(u, [4.0, 3.5], [4.1, 3.5 + 1e-3]) for u in "xyz"]
    assert [u.diffs.tolist() for u in paired_users(real, "a", "b", "nll")] == [
        pytest.approx([0.1, 1e-3])
    ] * 3


def test_choose_alpha_takes_the_lowest_change_and_needs_a_gain_to_steer() -> None:
    assert choose_alpha({0.0: 0.0, 0.5: -0.02, 1.0: -0.05}) == 1.0
    assert choose_alpha({0.0: 0.0, 0.5: -0.02, 1.0: 0.01}) == 0.5
    assert choose_alpha({0.0: 0.0, 0.5: 0.003, 1.0: 0.01}) == 0.0  # steering hurts: none
    assert choose_alpha({0.0: 0.0, 1.0: 0.0}) == 0.0  # a tie is no gain
    assert choose_alpha({0.5: 0.2, 1.0: float("nan")}) == 0.5
    with pytest.raises(ValueError, match="no finite"):
        choose_alpha({1.0: float("nan")})
    assert check_alpha_candidates([1, 0, 0.5, 1]) == (0.0, 0.5, 1.0)
    for bad in ([], [-0.5], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="alpha"):
            check_alpha_candidates(bad)


def test_each_methods_strength_is_chosen_on_its_validation_items(tiny: Any, tmp_path: Path) -> None:
    users = make_synthetic_users(n_users=3, n_history=6, n_heldout=1, seed=4)
    experiment = Experiment(
        tiny, users, tmp_path, CONFIG, generate=False, progress=False, alphas=(1, 0, 0.5)
    )
    metrics = experiment.run()
    choice = metrics.config["strength_choice"]
    assert choice["n_users"] == 3
    fits = experiment.fit()
    tokenizer = get_adapter(tiny).tokenizer

    def validation_nll(user: UserHistory, vector: Any) -> float:
        texts = [encode_for_eval(tokenizer, item) for item in fit_split(user, 2)[1]]
        values = token_nll(tiny, texts, [vector] * len(texts))
        return float(sum(float(v.sum()) for v in values) / sum(v.numel() for v in values))

    by_hand = np.mean(
        [
            validation_nll(u, experiment.pipeline.method_vector(fits[1], u.user_id, "baseline", 1))
            - validation_nll(u, None)
            for u in users
        ]
    )
    entry = choice["methods"]["baseline"]
    assert entry["candidates"] == [0.0, 0.5, 1.0]
    assert entry["validation_nll_change"][2] == pytest.approx(by_hand, abs=1e-4)
    none = metrics.methods["none"]["nll"]
    for method in STEERED_METHODS:
        entry = choice["methods"][method]
        changes = dict(zip(entry["candidates"], entry["validation_nll_change"], strict=True))
        assert changes[0.0] == 0.0
        assert entry["alpha"] == min(changes, key=lambda a: (changes[a], a))
        assert metrics.config["cells"][method]["alpha"] == entry["alpha"]  # applied
        if entry["alpha"] == 0:  # not applied: held-out NLL is that of no steering
            assert metrics.methods[method]["nll"] == pytest.approx(none, abs=1e-5)
            assert metrics.methods[method]["steering_norm"] == 0
        else:
            assert metrics.methods[method]["steering_norm"] > 0
    assert "Strengths chosen on validation items" in (tmp_path / "report.md").read_text()


def test_a_changed_validation_item_changes_the_run_key_only_when_it_chooses(
    tiny: Any, tmp_path: Path
) -> None:
    users = make_synthetic_users(n_users=3, n_history=6, n_heldout=1, seed=4)
    changed = [replace(u, history=list(u.history)) for u in users]
    changed[0].history[-1] = replace(changed[0].history[-1], output="a different answer")

    def key(population: list[UserHistory], **options: Any) -> str:
        return Experiment(tiny, population, tmp_path, CONFIG, progress=False, **options).key

    assert key(users) == key(changed)  # validation items are not read without a choice
    assert key(users, alphas=(0, 1)) != key(changed, alphas=(0, 1))
