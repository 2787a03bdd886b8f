"""Pooling evaluations on disjoint time windows (`steerx eval --window k`, `steerx pool`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from steerx_lens import cli
from steerx_lens.errors import DataError
from steerx_lens.evaluation.experiment import aggregate
from steerx_lens.evaluation.pooling import pool_runs, read_run
from steerx_lens.evaluation.results import ItemValues, UserRecord

CONFIG = {"backbone": "mean_diff", "site_kind": "hook_resid_post", "seed": 0, "layer": 12}


def record(uid: str, steerx: list[float], baseline: list[float], norm: float) -> UserRecord:
    weights = [2] * len(steerx)
    items = {
        "baseline": {"nll": ItemValues(baseline, weights)},
        "steerx": {"nll": ItemValues(steerx, weights)},
    }
    return UserRecord(
        uid, f"k{uid}", sum(weights), {}, f"{uid} likes x", [], 0, False, items, {"steerx": norm}
    )


def run(window: int, records: list[UserRecord], **config: Any) -> dict[str, Any]:
    full = {
        **CONFIG,
        "window": window,
        "cells": {"steerx": {"layer": 12, "alpha": window}},
        **config,
    }
    return aggregate(records, full, {}, n_boot=50).to_json()


def test_each_users_items_of_every_window_are_pooled() -> None:
    first = run(0, [record("a", [1.0, 2.0], [1.5, 2.5], 0.1), record("b", [3.0], [3.0], 0.2)])
    second = run(1, [record("a", [4.0], [3.0], 0.3), record("c", [1.0], [2.0], 0.1)])
    pooled = pool_runs([first, second])
    assert [r.user_id for r in pooled.per_user] == ["a"]  # only users of every window
    assert set(pooled.failures) == {"b", "c"}
    a = pooled.per_user[0]
    assert a.items["steerx"]["nll"].values == [1.0, 2.0, 4.0]
    assert a.scores["steerx"]["nll"] == pytest.approx(7 / 3)  # token-weighted over all items
    assert a.steering_norm == {"steerx": pytest.approx(0.2)}
    assert a.description == "window 0: a likes x\nwindow 1: a likes x"
    reversed_order = pool_runs([second, first]).per_user[0]
    assert reversed_order.description == "window 1: a likes x\nwindow 0: a likes x"
    (row,) = [c for c in pooled.comparisons if (c["a"], c["b"]) == ("steerx", "baseline")]
    assert row["mean"] == pytest.approx(0.0)  # baseline − SteerX per item: (0.5 + 0.5 − 1) / 3
    assert row["n_users"] == 1
    assert pooled.config["window"] == [0, 1]
    assert [r["cells"]["steerx"]["alpha"] for r in pooled.config["pooled_runs"]] == [0, 1]


def test_pooling_sharpens_a_per_user_mean() -> None:
    # SteerX is better by 0.1 on every item; a window adds an item per user, not a user
    users = [record(u, [1.0], [1.1], 0.1) for u in "abcdef"]
    single = run(0, users)
    pooled = pool_runs([single, run(1, users), run(2, users)])
    assert all(len(r.items["steerx"]["nll"].values) == 3 for r in pooled.per_user)
    (primary,) = [
        c
        for c in pooled.comparisons
        if (c["a"], c["b"], c["metric"]) == ("steerx", "baseline", "nll")
    ]
    assert primary["n_users"] == 6 and primary["mean"] == pytest.approx(0.1)


def test_runs_that_differ_in_more_than_the_window_are_refused() -> None:
    users = [record("a", [1.0], [1.1], 0.1)]
    with pytest.raises(DataError, match="at least 2 runs"):
        pool_runs([run(0, users)])
    with pytest.raises(DataError, match=r"window\(s\) \[1\] given twice"):
        pool_runs([run(1, users), run(1, users)])
    with pytest.raises(DataError, match=r"differs from run 0 in \['backbone'\]"):
        pool_runs([run(0, users), run(1, users, backbone="bipo")])
    other_users = [record("z", [1.0], [1.1], 0.1)]
    with pytest.raises(DataError, match="no user was evaluated in every pooled run"):
        pool_runs([run(0, users), run(1, other_users)])


def test_a_summary_or_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a finished `steerx eval` folder"):
        read_run(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"per_user_scores": {}}))
    with pytest.raises(DataError, match="no per_user records"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"config": {}, "per_user": []}))
    assert read_run(tmp_path / "run.json") == {"config": {}, "per_user": []}  # a file itself
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(DataError, match="not readable JSON"):
        read_run(tmp_path)


def test_eval_on_two_windows_then_pool(tmp_path: Path) -> None:
    """The whole path on real data: two windows of two health accounts, the tiny model."""
    runner = CliRunner()
    base = [
        "eval",
        "--tiny",
        "--layer",
        "1",
        "--no-generations",
        "--describer",
        "template",
        "--data",
        "health_tweets",
        "--users",
        "2",
        "--alpha",
        "1",
    ]
    folders = []
    for window in (0, 1):
        folder = tmp_path / f"w{window}"
        result = runner.invoke(cli.app, [*base, "--window", str(window), "--out", str(folder)])
        assert result.exit_code == 0, result.output
        folders.append(folder)
    runs = [json.loads((f / "metrics.json").read_text()) for f in folders]
    assert [r["config"]["window"] for r in runs] == [0, 1]
    tokens = [{u["user_id"]: u["n_heldout_tokens"] for u in r["per_user"]} for r in runs]
    result = runner.invoke(cli.app, ["pool", *map(str, folders), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    pooled = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert pooled["config"]["window"] == [0, 1]
    for user in pooled["per_user"]:
        uid = user["user_id"]
        assert user["n_heldout_tokens"] == tokens[0][uid] + tokens[1][uid]
        assert len(user["items"]["steerx"]["nll"]["values"]) == 2 * 4  # 4 held out per window
    report = (tmp_path / "p" / "report.md").read_text()
    assert "window 1" in report and "attribution/" not in report  # no dangling links
    assert "attribution/" in (folders[0] / "report.md").read_text()
    again = runner.invoke(
        cli.app, ["pool", str(folders[0]), str(folders[0]), "--out", str(tmp_path / "q")]
    )
    assert again.exit_code == 1 and "given twice" in again.output
