"""The ``steerx`` command line, on the tiny model."""

from __future__ import annotations

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
