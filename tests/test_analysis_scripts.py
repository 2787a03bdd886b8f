"""The analysis scripts whose numbers docs/method.md cites: goal_power.py and goal_table.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from steerx_lens.evaluation.experiment import GOAL_FAMILY

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_power_differences_are_signed_so_that_positive_favours_the_first_method() -> None:
    power = script("goal_power")
    per_user = {
        "u": {"steerx": {"nll": 3.0, "rougeL": 12.0}, "baseline": {"nll": 3.5, "rougeL": 10.0}},
        "v": {"steerx": {"nll": 4.0}, "baseline": {"nll": 3.9}},  # no ROUGE-L: left out
    }
    assert power.differences(per_user, "steerx", "baseline", "nll") == pytest.approx([0.5, -0.1])
    assert power.differences(per_user, "steerx", "baseline", "rougeL") == pytest.approx([2.0])


def test_power_is_high_for_a_consistent_effect_and_nil_for_a_split_one() -> None:
    power = script("goal_power")
    rng = np.random.default_rng(0)
    consistent = np.linspace(0.1, 0.9, 9)  # every user better: every resample p = 2/2^9
    assert (power.resampled_p(consistent, 9, 50, rng) < 0.05).mean() == 1.0
    against = -consistent  # a resample only counts when it favours the first method
    assert (power.resampled_p(against, 9, 50, rng) < 0.05).mean() == 0.0
    split = np.array([1.0, -1.0] * 8)
    assert (power.resampled_p(split, 16, 200, rng) < 0.05).mean() < 0.1


def test_goal_table_applies_holm_over_the_goal_family_alone(tmp_path: Path) -> None:
    table = script("goal_table")
    comparisons = [
        {
            "a": a,
            "b": b,
            "metric": m,
            "mean": 0.1,
            "ci95": [0.0, 0.2],
            "wilcoxon_p": 0.01,
            "p_holm": 0.5,
            "n_users": 9,
            "n_positive": 8,
        }
        for a, b, m in GOAL_FAMILY
    ]
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({"config": {"data": "d", "backbone": "bipo"}, "comparisons": comparisons})
    )
    rows = table.rows(path)
    assert len(rows) == len(GOAL_FAMILY)
    # six equal p's of 0.01: Holm over the family gives 0.06 each; over all comparisons 0.5
    assert all("0.06" in row and row.endswith(" 0.5 |") for row in rows), rows
    assert rows[0].startswith("| d / bipo (run)")
