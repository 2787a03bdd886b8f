"""Metrics on hand-checked cases, the eval run's schema, resume, and sweeps' data hygiene."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.attribution import Span
from steerx_lens.backends import get_adapter
from steerx_lens.data import UserHistory, make_synthetic_users
from steerx_lens.evaluation.experiment import Experiment
from steerx_lens.evaluation.metrics import (
    ALL_METHODS,
    encode_for_eval,
    generation_scores,
    paired_stats,
    token_nll,
)
from steerx_lens.evaluation.results import GenerationScores, MethodScores, UserRecord
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import SteerXConfig
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


def test_paired_stats_on_hand_checked_cases() -> None:
    stats = paired_stats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert stats.mean == 3.5 and stats.n == 6 and stats.n_positive == 6
    assert 1.0 <= stats.ci_low < 3.5 < stats.ci_high <= 6.0
    assert stats.wilcoxon_p == pytest.approx(0.03125)  # exact two-sided, all 6 positive
    assert paired_stats([0.0, 0.0]).wilcoxon_p is None
    with pytest.raises(ValueError):
        paired_stats([])


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


def test_eval_writes_the_documented_schema_and_resumes(
    tiny: Any, users: list, tmp_path: Path
) -> None:
    options = {"max_new_tokens": 4, "progress": False, "users_per_batch": 2}  # groups of 2 and 1
    metrics = Experiment(tiny, users, tmp_path, CONFIG, **options).run()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(on_disk) >= {"config", "methods", "per_user", "stats"}
    assert set(on_disk["methods"]) == set(ALL_METHODS)
    for method in ("none", "baseline", "steerx", "history_prompt", "shared"):
        assert set(on_disk["methods"][method]) == {"nll", "nll_pref", "rouge1", "rougeL", "bleu"}
        assert math.isfinite(on_disk["methods"][method]["nll"])
    for method in ("baseline_other", "steerx_other"):
        assert "nll" in on_disk["methods"][method]
    assert [u["user_id"] for u in on_disk["per_user"]] == [u.user_id for u in users]
    assert set(on_disk["stats"]["personalization_margin"]) == {"baseline", "steerx"}
    assert (tmp_path / "report.md").read_text().startswith("# SteerX evaluation report")
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
    # resumed users are read back into typed records and written out unchanged
    assert (tmp_path / "metrics.json").read_bytes() == first_run


def test_user_records_round_trip_through_json() -> None:
    generation = GenerationScores(rouge1=50.0, rougeL=40.0, bleu=10.0)
    record = UserRecord(
        user_id="u",
        config_key="key",
        n_heldout_tokens=10,
        n_pref_tokens=2,
        description=None,
        top_spans=[Span(" Cheers", 1.5, 2)],
        n_swapped_tokens=3,
        steerx_fallback=False,
        scores={
            "none": MethodScores(2.0, None, generation),
            "steerx_other": MethodScores(1.0, 3.0),
        },
        generations={"none": ["hello"]},
    )
    data = json.loads(json.dumps(record.to_json()))
    assert list(data) == [
        "user_id",
        "config_key",
        "n_heldout_tokens",
        "n_pref_tokens",
        "description",
        "top_spans",
        "n_swapped_tokens",
        "steerx_fallback",
        "none",
        "steerx_other",
        "generations",
    ]
    assert data["none"] == {
        "nll": 2.0,
        "nll_pref": None,
        "rouge1": 50.0,
        "rougeL": 40.0,
        "bleu": 10.0,
    }
    assert data["top_spans"] == [{"text": " Cheers", "score": 1.5, "count": 2}]
    assert UserRecord.from_json(data, ALL_METHODS) == record


def test_sweep_never_touches_heldout_items(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = make_synthetic_users(n_users=3, n_history=5, n_heldout=1, seed=3)
    heldout_texts = {item.output for user in users for item in user.heldout}
    tokenizer = get_adapter(tiny).tokenizer
    seen: list[str] = []
    adapter_class = type(get_adapter(tiny))
    original_encode = adapter_class.encode

    def spying_encode(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        batch = original_encode(self, inputs, *args, **kwargs)  # every model call encodes
        seen.extend(tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True))
        return batch

    monkeypatch.setattr(adapter_class, "encode", spying_encode)
    result = run_sweep(tiny, users, [0, 1], [1.0], tmp_path, CONFIG, rs=(0.1,), progress=False)
    assert seen, "the spy saw no forward passes"
    assert not any(text in s for text in heldout_texts for s in seen)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["layer"] in (0, 1)
    cell = (result["layers"].index(best["layer"]), result["alphas"].index(best["alpha"]))
    for method in ("baseline", "shared"):  # the controls at SteerX's chosen cell
        assert best[f"{method}_nll_change"] == result["nll_change"][method][cell[0]][cell[1]]
    assert len(result["nll_change"]["steerx"]) == 2
    assert os.path.exists(tmp_path / "heatmap_steerx.png")


def test_parse_layers() -> None:
    assert parse_layers("4:24:4") == [4, 8, 12, 16, 20]
    assert parse_layers("8,12") == [8, 12]


def test_preference_masks_shorter_than_the_item_cover_its_first_tokens() -> None:
    from steerx_lens.evaluation.experiment import _pooled_nll

    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert _pooled_nll([nll]) == 2.5
    assert _pooled_nll([nll], [torch.tensor([False, True])]) == 2.0
    assert _pooled_nll([nll], [torch.tensor([False, False])]) is None
