"""The ``steerx`` command line, on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from nnsight import CONFIG
from typer.testing import CliRunner

from steerx_lens.cli import app, main


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
    assert result.exit_code == 1
    assert "out of range" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "demo.md").exists()


def test_attribute_writes_ranked_spans_descriptions_and_html(tmp_path: Path) -> None:
    args = ["attribute", "--tiny", "--data", "synthetic", "--users", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--describer", "template", "--layer-map"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "attribution.json").read_text())
    assert report["config"]["method"] == "patch" and report["config"]["max_history"] is None
    assert [u["user_id"] for u in report["users"]] == ["synthetic-00", "synthetic-01"]
    for user in report["users"]:
        scores = [span["score"] for span in user["spans"]]
        assert scores == sorted(scores, reverse=True)
        assert all(set(span) == {"text", "score", "count"} for span in user["spans"])
        assert user["description"]
        assert (tmp_path / user["html"]).read_text().startswith("<!doctype html>")
        assert (tmp_path / user["layer_map"]).read_bytes()[:4] == b"\x89PNG"
    # the tiny random model finds no spans: no description-quality claim without them
    assert all(not u["spans"] for u in report["users"]) and "description_quality" not in report


def test_attribute_keeps_the_last_max_history_items(tmp_path: Path) -> None:
    args = ["attribute", "--tiny", "--users", "2", "--out", str(tmp_path)]
    kept = CliRunner().invoke(app, [*args, "--max-history", "2"])
    assert kept.exit_code == 0, kept.output
    assert json.loads((tmp_path / "attribution.json").read_text())["config"]["max_history"] == 2
    # one item left: attribution needs two, so every user fails, with the reason
    single = CliRunner().invoke(app, [*args, "--max-history", "1"])
    assert single.exit_code != 0 and "at least 2" in single.output


@pytest.mark.demo
def test_attribute_scores_its_descriptions_against_other_users(tmp_path: Path) -> None:
    args = ["attribute", "--data", "synthetic", "--users", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "attribution.json").read_text())
    users = report["users"]
    top = {u["user_id"]: [s["text"].strip().lower() for s in u["spans"][:6]] for u in users}
    text = {u["user_id"]: u["description"].lower() for u in users}
    assert all(top.values())
    own = [sum(s in text[u] for s in top[u]) / len(top[u]) for u in top]
    other = [sum(s in text[u] for s in top[v]) / len(top[v]) for u in top for v in top if v != u]
    quality = report["description_quality"]
    assert quality["n_users"] == 2 and quality["faithfulness"] == 1.0
    assert quality["own_spans_named"] == pytest.approx(sum(own) / 2)
    assert quality["other_spans_named"] == pytest.approx(sum(other) / 2)
    assert quality["own_spans_named"] > quality["other_spans_named"]
    assert "of their own user's top spans" in " ".join(result.output.split())


def test_fit_then_generate_with_a_saved_vector(tmp_path: Path) -> None:
    out = tmp_path / "fit"
    args = ["fit", "--tiny", "--users", "3", "--layer", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "fit.json").read_text())
    assert len(summary["users"]) == 3 and summary["config"]["layer"] == 1
    vector_file = out / summary["users"][0]["vectors"]["steerx"]
    assert vector_file.exists() and (out / summary["users"][0]["vectors"]["baseline"]).exists()
    args = [
        "generate",
        "--tiny",
        "--vector",
        str(vector_file),
        "--prompt",
        "Hi",
        "--max-new-tokens",
    ]
    result = CliRunner().invoke(app, [*args, "4"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_fit_builds_the_construction_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "fit"
    args = ["fit", "--tiny", "--users", "3", "--layer", "1", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--construction", "minimal_pairs"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "fit.json").read_text())
    assert summary["config"]["construction"] == "minimal_pairs"


def test_eval_through_the_remote_path_writes_metrics(tmp_path: Path) -> None:
    args = ["eval", "--tiny", "--data", "synthetic", "--users", "3", "--layer", "1"]
    args += ["--no-generations", "--describer", "template", "--out", str(tmp_path)]
    args += ["--backend", "nnsight", "--remote", "local", "--users-per-batch", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["per_user"]) == 3
    assert metrics["methods"]["steerx"]["nll"] is not None
    assert sorted(p.name for p in (tmp_path / "users").iterdir())[0].endswith(".json")
    # the default protocol chooses each method's strength on validation items, remote path too
    choice = metrics["config"]["strength_choice"]
    assert choice["n_users"] == 3 and set(choice["methods"]) == set(metrics["config"]["cells"])
    assert "alpha chosen on validation items (3 users)" in " ".join(result.output.split())
    assert "goal: steerx vs baseline, nll:" in " ".join(result.output.split())
    assert [c["metric"] for c in metrics["goal"]][:1] == ["nll"]


def test_remote_options_are_checked(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["eval", "--tiny", "--remote", "local", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--backend nnsight" in result.output
    args = ["eval", "--backend", "nnsight", "--remote", "ndif", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--model ORG/NAME" in result.output


def test_console_script_prints_library_errors_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    argv = ["steerx", "eval", "--backend", "nnsight", "--remote", "ndif", "--model", "org/name"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "NDIF API key" in err and "Traceback" not in err
