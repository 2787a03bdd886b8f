"""The ``steerx`` command line, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from steerx_lens.cli import app


def test_demo_writes_a_report_with_steered_and_unsteered_text(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--tiny", "--layer", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "demo.md").read_text()
    assert "| prompt | unsteered | steered |" in report
    rows = [line for line in report.splitlines() if line.startswith("| Tell me")]
    assert len(rows) == 1
    _, prompt, before, after, _ = rows[0].split("|")
    assert before.strip() != after.strip()  # steering changed the continuation


def test_demo_rejects_a_layer_out_of_range(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--tiny", "--layer", "9", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "out of range" in str(result.exception)
    assert not (tmp_path / "demo.md").exists()


def test_attribute_writes_ranked_spans_descriptions_and_html(tmp_path: Path) -> None:
    args = ["attribute", "--tiny", "--data", "synthetic", "--users", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--describer", "template", "--layer-map"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "attribution.json").read_text())
    assert report["config"]["method"] == "patch"
    assert [u["user_id"] for u in report["users"]] == ["synthetic-00", "synthetic-01"]
    for user in report["users"]:
        scores = [span["score"] for span in user["spans"]]
        assert scores == sorted(scores, reverse=True)
        assert all(set(span) == {"text", "score", "count"} for span in user["spans"])
        assert user["description"]
        assert (tmp_path / user["html"]).read_text().startswith("<!doctype html>")
        assert (tmp_path / user["layer_map"]).read_bytes()[:4] == b"\x89PNG"
