"""The CLI and the file formats under bad input (issue 14): nothing lost, nothing stale, no late
crash. One test (or a few) per item of the issue, then property tests with random ids, option
values and bytes. Everything runs on the tiny model with a few synthetic users."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from json_numbers import assert_same_numbers
from steerx_lens import cli
from steerx_lens.atomic import write_text
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory, make_synthetic_users, save_users
from steerx_lens.evaluation import experiment as experiment_module
from steerx_lens.evaluation.cells import STEERED_METHODS
from steerx_lens.evaluation.experiment import Experiment
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import SteerX, SteerXConfig, steerx_combination
from steerx_lens.runs import KEPT_NAME, MAX_NAME_CHARS, user_file_names
from steerx_lens.vectors import SteeringVector

CONFIG = SteerXConfig(layer=1, answer_tokens=4, max_context_tokens=256)
EVAL = ["eval", "--tiny", "--layer", "1", "--no-generations", "--describer", "template"]
LONG_TEXT = " ".join(["word"] * 5000)  # about 5,000 tokens: more than the tiny model's 1,024
PROPERTY = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


def small_users(n_users: int = 3, seed: int = 2) -> list[UserHistory]:
    return make_synthetic_users(n_users=n_users, n_history=3, n_heldout=1, seed=seed)


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def assert_one_line_error(result: Any, code: int, *fragments: str) -> str:
    """Exit status ``code``, no traceback, exactly one ``error:`` line holding ``fragments``."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def user_json(tmp: Path, name: str) -> dict[str, Any]:
    return json.loads((tmp / name).read_text())


# -------------------------------------------------------------------- 1. stale results
def test_editing_a_users_items_recomputes_every_user(tmp_path: Path) -> None:
    data, out = tmp_path / "users.jsonl", tmp_path / "run"
    users = small_users()
    save_users(users, data)
    assert invoke(*EVAL, "--data", data, "--out", out).exit_code == 0
    first = user_json(out, "metrics.json")
    assert "- 0 of 3 users reused" in (out / "report.md").read_text()

    edited = users[1]
    history = [replace(edited.history[0], output="Short."), *edited.history[1:]]
    heldout = [replace(edited.heldout[0], output="Fine.")]
    save_users([users[0], replace(edited, history=history, heldout=heldout), users[2]], data)
    result = invoke(*EVAL, "--data", data, "--out", out)
    assert result.exit_code == 0, result.output
    second = user_json(out, "metrics.json")
    assert "- 0 of 3 users reused" in (out / "report.md").read_text()
    before, after = first["per_user"], second["per_user"]
    assert after[1]["n_heldout_tokens"] < before[1]["n_heldout_tokens"]  # the new text
    # the population changed: the leave-one-out shared vector of another user moved
    assert after[0]["scores"]["shared"]["nll"] != before[0]["scores"]["shared"]["nll"]
    assert all(a["config_key"] != b["config_key"] for a, b in zip(after, before, strict=True))

    assert invoke(*EVAL, "--data", data, "--out", out).exit_code == 0  # nothing changed
    assert "- 3 of 3 users reused" in (out / "report.md").read_text()
    assert user_json(out, "metrics.json") == second


# -------------------------------------------------------------------- 2. file names
def test_ids_that_sanitise_alike_get_their_own_files(tmp_path: Path) -> None:
    ids = ["a/b", "a_b", "..", "x" * 300]
    users = [replace(user, user_id=uid) for user, uid in zip(small_users(4), ids, strict=True)]
    save_users(users, tmp_path / "users.jsonl")
    out = tmp_path / "fit"
    args = ["fit", "--tiny", "--layer", "1", "--mode", "steerx", "--out", out]
    result = invoke(*args, "--data", tmp_path / "users.jsonl")
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.steerx.safetensors"))
    assert len(files) == 4 and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(SteeringVector.load(p).user_id for p in files) == sorted(ids)
    index = user_json(out, "names.json")
    assert {index[p.name.removesuffix(".steerx.safetensors")] for p in files} == set(ids)
    assert all(len(p.name) < 100 for p in files)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=12, unique=True))
def test_user_file_names_are_distinct_valid_visible_and_bounded(ids: list[str]) -> None:
    names = user_file_names(ids)
    assert set(names) == set(ids)
    assert len({name.casefold() for name in names.values()}) == len(ids)
    for uid, name in names.items():
        assert len(name) <= MAX_NAME_CHARS and not name.startswith((".", "-"))
        assert KEPT_NAME.fullmatch(name.replace("~", "_")), name
        assert name == uid or "~" in name
    assert user_file_names(list(reversed(ids))) == names  # no dependence on the order


# -------------------------------------------------------------------- 3. invalid options
BAD_OPTIONS = [
    (["eval", "--backbone", "foo"], "--backbone"),
    (["eval", "--describer", "foo"], "--describer"),
    (["fit", "--describer", "foo"], "--describer"),
    (["attribute", "--method", "foo"], "--method"),
    (["fit", "--mode", "foo"], "--mode"),
    (["eval", "--max-history", "0"], "--max-history"),
    (["sweep", "--max-history", "0"], "--max-history"),
    (["eval", "--max-history", "-1"], "--max-history"),
    (["fit", "--users", "0"], "--users"),
    (["fit", "--users", "-1"], "--users"),
    (["eval", "--users", "0"], "--users"),
    (["eval", "--window", "-1"], "--window"),
    (["eval", "--window", "1", "--data", "synthetic"], "--window"),
    (["attribute", "--window", "1", "--data", "synthetic"], "--window"),
    (["attribute", "--max-history", "0"], "--max-history"),
    (["eval", "--r", "nan"], "--r"),
    (["eval", "--r", "-1"], "--r"),
    (["eval", "--alpha", "nan"], "--alpha"),
    (["eval", "--alphas", "0,-1"], "--alphas"),
    (["eval", "--alphas", ""], "--alphas"),
    (["fit", "--alpha", "inf"], "--alpha"),
    (["eval", "--users-per-batch", "0"], "--users-per-batch"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--layer", "-1"], "--layer"),
    (["eval", "--backend", "foo"], "--backend"),
    (["eval", "--remote", "foo"], "--remote"),
    (["eval", "--data", "no/such/file.jsonl"], "--data"),
    (["eval", "--model", "no/such/folder"], "--model"),
    (["sweep", "--alphas", "0,nan"], "--alphas"),
    (["sweep", "--rs", "-0.1"], "--rs"),
    (["sweep", "--layers", "1:x"], "--layers"),
    (["sweep", "--layers", "5:1"], "--layers"),
    (["sweep", "--n-validation", "0"], "--n-validation"),
    (["demo", "--alpha", "nan"], "--alpha"),
    (["eval", "--construction", "nope"], "--construction"),
    (["fit", "--backbone", "bipo", "--construction", "description_contrast"], "--construction"),
    (["sweep", "--construction", "nope"], "--construction"),
    (["generate", "--vector", "v", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
]


@pytest.mark.parametrize(("args", "option"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_invalid_options_are_refused_before_any_model_loads(
    args: list[str], option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*_: Any, **__: Any) -> None:
        raise AssertionError("a model was loaded although an option is invalid")

    monkeypatch.setattr(cli, "load_model", no_model)
    result = (
        invoke(*args, "--tiny", "--out", tmp_path / "out")
        if args[0] != "generate"
        else (invoke(*args, "--tiny"))
    )
    assert_one_line_error(result, 2, option)
    assert not (tmp_path / "out").exists()


def test_a_bad_best_file_is_refused_naming_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for content in ('{"alpha": NaN}', '{"layer": -3}', "[1, 2]", "{not json", '{"r": "x"}'):
        best = write_text(tmp_path / "best.json", content)
        result = invoke(*EVAL, "--best", best, "--out", tmp_path / "out")
        assert_one_line_error(result, 2, "--best")


# -------------------------------------------------------------------- 4. crashes
def test_alpha_zero_is_no_steering_and_negative_alpha_negates_everything() -> None:
    generator = torch.Generator().manual_seed(0)
    shared, direction = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    direction = direction / direction.norm()
    vector = steerx_combination(shared, direction, r=0.15, residual_norm=7.0)
    assert torch.allclose(vector, shared + 0.15 * 7.0 * direction)  # the vector added at alpha 1
    assert torch.equal(0.0 * vector, torch.zeros(64))  # applied with alpha 0: nothing added
    for alpha in (-0.5, -2.0):  # alpha scales the whole vector, personal part included
        assert torch.allclose(alpha * vector, alpha * shared + alpha * 1.05 * direction, atol=1e-5)
    assert torch.equal(steerx_combination(shared, None, r=0.15, residual_norm=7.0), shared)


def test_a_sweep_with_alpha_zero_runs_and_alpha_zero_changes_nothing(tmp_path: Path) -> None:
    save_users(make_synthetic_users(n_users=3, n_history=4, n_heldout=0, seed=1), tmp_path / "u")
    args = ["sweep", "--tiny", "--data", tmp_path / "u", "--layers", "1", "--alphas", "0,1"]
    result = invoke(*args, "--rs", "0.1", "--n-validation", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    sweep = user_json(tmp_path / "out", "sweep.json")
    for method in STEERED_METHODS:
        assert sweep["nll_change"][method][0][0][0] == 0.0  # alpha 0 = no steering, exactly
    # --max-history 2 leaves no user a validation item next to 2 fit items: a one-line error
    short = invoke(*args, "--n-validation", "1", "--max-history", "2", "--out", tmp_path / "o2")
    assert short.exit_code == 1 and "at least 2 users" in short.output, short.output


def test_library_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    lines = [json.dumps(user.to_dict()) for user in small_users()]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    assert_one_line_error(invoke(*EVAL, "--data", broken, "--out", tmp_path / "o"), 1, ":2:")

    latin1 = tmp_path / "latin1.jsonl"
    third = lines[2].replace('"user_id": "', '"user_id": "\u00e9', 1)
    latin1.write_bytes("\n".join([*lines[:2], third]).encode("latin-1"))
    error = assert_one_line_error(invoke(*EVAL, "--data", latin1, "--out", tmp_path / "o"), 1)
    assert f"{latin1}:3: not UTF-8" in error

    debug = CliRunner().invoke(cli.app, ["--debug", *EVAL, "--data", str(latin1)])
    assert debug.exit_code == 1 and isinstance(debug.exception, ValueError)


# -------------------------------------------------------------------- 5. isolation
def test_an_over_long_item_is_skipped_and_every_user_is_evaluated(tmp_path: Path) -> None:
    users = small_users()
    users[0].history.append(HistoryItem("Tell me everything.", LONG_TEXT))
    users[1].heldout.insert(0, HistoryItem("And now?", LONG_TEXT))
    save_users(users, tmp_path / "users.jsonl")
    data = tmp_path / "users.jsonl"
    result = invoke(*EVAL, "--data", data, "--n-validation", "0", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    metrics = user_json(tmp_path / "out", "metrics.json")
    assert [u["user_id"] for u in metrics["per_user"]] == [u.user_id for u in users]
    (history,) = metrics["skipped_items"]["synthetic-00"]
    (heldout,) = metrics["skipped_items"]["synthetic-01"]
    assert history.startswith("user 'synthetic-00' history item 3 skipped: it has ")
    assert heldout.startswith("user 'synthetic-01' held-out item 0 skipped:")
    assert "more than the model's context (1024)" in history
    assert "Items not used" in (tmp_path / "out" / "report.md").read_text()


def test_the_population_leaves_out_a_user_whose_baseline_fails(tiny: Any) -> None:
    users = small_users(3)
    broken = UserHistory("broken", [HistoryItem("Hi", LONG_TEXT), HistoryItem("Yo", "ok")])
    result = SteerX(tiny, CONFIG, progress=False).fit_many([*users, broken])
    assert sorted(result.users) == [u.user_id for u in users]
    assert "ContextLengthError" in result.failures["broken"]
    assert [u.user_id for u in result.population.users] == [u.user_id for u in users]


def test_a_user_whose_evaluation_fails_is_reported_and_the_others_finish(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = experiment_module.preference_masks

    def failing_for_one(model: Any, user: UserHistory, *args: Any, **kwargs: Any) -> Any:
        if user.user_id == "synthetic-01":
            raise ValueError("this user's held-out text cannot be scored")
        return original(model, user, *args, **kwargs)

    monkeypatch.setattr(experiment_module, "preference_masks", failing_for_one)
    experiment = Experiment(tiny, small_users(), tmp_path, CONFIG, generate=False, progress=False)
    metrics = experiment.run()
    assert [u.user_id for u in metrics.per_user] == ["synthetic-00", "synthetic-02"]
    assert "cannot be scored" in metrics.failures["synthetic-01"]


def test_a_run_without_evaluable_users_is_an_error(tmp_path: Path) -> None:
    users = make_synthetic_users(n_users=3, n_history=3, n_heldout=0, seed=2)
    save_users(users, tmp_path / "users.jsonl")
    result = invoke(*EVAL, "--data", tmp_path / "users.jsonl", "--out", tmp_path / "out")
    assert_one_line_error(result, 1, "no user has both usable history and held-out items")
    assert not (tmp_path / "out" / "metrics.json").exists()


# -------------------------------------------------------------------- 6. one run per --out
def test_a_second_run_into_a_held_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom steerx_lens.runs import out_lock\n"
            f"with out_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        save_users(small_users(), tmp_path / "users.jsonl")
        result = invoke(*EVAL, "--data", tmp_path / "users.jsonl", "--out", out)
        assert_one_line_error(
            result, 1, f"{out} is in use by another steerx run (pid {holder.pid})"
        )
        assert [p.name for p in out.iterdir()] == ["steerx.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder releases the folder
        holder.wait()
    from steerx_lens.runs import out_lock

    with out_lock(out):
        pass
    assert list(out.iterdir()) == []


# -------------------------------------------------------------------- 7. smaller
@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_files_are_written_with_the_users_umask(tmp_path: Path, tiny: Any, umask: int) -> None:
    old = os.umask(umask)
    try:
        vector = SteeringVector(
            torch.ones(64), "blocks.0.hook_resid_post", get_adapter(tiny).fingerprint()
        )
        paths = [
            write_text(tmp_path / "report.md", "hi"),
            vector.save(tmp_path / "v.safetensors"),
            save_users(small_users(2), tmp_path / "users.jsonl"),
        ]
        for path in paths:
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
        os.chmod(paths[0], 0o600)
        write_text(paths[0], "again")
        assert paths[0].stat().st_mode & 0o777 == 0o600  # a replaced file keeps its mode
    finally:
        os.umask(old)


def test_vector_files_are_reproducible_byte_for_byte(tmp_path: Path, tiny: Any) -> None:
    fingerprint = get_adapter(tiny).fingerprint()
    first = SteeringVector(torch.ones(64), "blocks.0.hook_resid_post", fingerprint, user_id="u")
    time.sleep(0.01)
    second = SteeringVector(torch.ones(64), "blocks.0.hook_resid_post", fingerprint, user_id="u")
    a, b = first.save(tmp_path / "a.safetensors"), second.save(tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    (2 * first).save(tmp_path / "c.safetensors")
    time.sleep(0.01)
    (2 * second).save(tmp_path / "d.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()
    stamped = replace(first, created=1795734650.86).save(tmp_path / "e.safetensors")
    assert SteeringVector.load(stamped).created == 1795734650.86  # still recorded when set


def test_a_resumed_eval_does_not_fit_again(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = make_synthetic_users(n_users=3, n_history=5, n_heldout=1, seed=2)  # validation
    options = {"generate": False, "progress": False, "alphas": (0.0, 0.5, 1.0)}
    Experiment(tiny, users, tmp_path, CONFIG, **options).run()
    record = tmp_path / "users" / "synthetic-01.json"
    finished, metrics = record.read_bytes(), (tmp_path / "metrics.json").read_bytes()
    record.unlink()  # as if the run had been interrupted before this user's evaluation

    def no_fit(*_: Any, **__: Any) -> None:
        raise AssertionError("the resumed run fitted again")

    for name in ("build_population", "evidence", "vectors", "model_answers"):
        monkeypatch.setattr(SteerX, name, no_fit)
    resumed = Experiment(tiny, users, tmp_path, CONFIG, **options)
    resumed.run()
    assert resumed.strength_choice is not None and resumed.strength_choice["methods"]
    saved = resumed.strength_file.read_bytes()
    for corrupt in (b"{}", b'{"methods": {"steerx": {"alpha": 7}}}', b"\xff"):
        resumed.strength_file.write_bytes(corrupt)  # the fit is saved: recomputed, no refit
        again = Experiment(tiny, users, tmp_path, CONFIG, **options)
        assert again.choose_strengths() == json.loads(saved)
        assert resumed.strength_file.read_bytes() == saved
    # the re-run user's rows no longer share forward batches with other users' rows, so its
    # float32 values may differ in the last bits
    assert_same_numbers(json.loads(record.read_bytes()), json.loads(finished))
    assert_same_numbers(json.loads((tmp_path / "metrics.json").read_bytes()), json.loads(metrics))


# -------------------------------------------------------------------- properties
def check_clean(result: Any, root: Path, inputs: set[Path], out: Path | None) -> None:
    """Exit 0 or a one-line error, no traceback, nothing written outside ``out``, no partial
    (temporary) file and no lock left."""
    event(f"exit status {result.exit_code}")
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code:
        assert_one_line_error(result, result.exit_code)
    else:
        assert result.exception is None, repr(result.exception)
    written = {p for p in root.rglob("*") if p.is_file()} - inputs
    assert all(out is not None and out in p.parents for p in written), written
    assert not [p for p in written if p.name.endswith(".tmp") or p.name == "steerx.lock"]


ITEM_TEXT = st.text(max_size=30)
USER_FILE = st.lists(
    st.tuples(
        st.text(max_size=40),
        st.lists(st.tuples(ITEM_TEXT, ITEM_TEXT), min_size=2, max_size=3),
        st.lists(st.tuples(ITEM_TEXT, ITEM_TEXT), max_size=1),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda user: user[0],
).map(
    lambda users: "\n".join(
        json.dumps(
            {
                "user_id": uid,
                "history": [{"input": i, "output": o} for i, o in history],
                "heldout": [{"input": i, "output": o} for i, o in heldout],
            }
        )
        for uid, history, heldout in users
    ).encode()
)


@PROPERTY
@given(
    content=st.one_of(st.binary(max_size=300), USER_FILE),
    suffix=st.sampled_from([".jsonl", ".json"]),
    command=st.sampled_from(["fit", "eval", "attribute"]),
)
def test_random_data_files_and_user_ids(content: bytes, suffix: str, command: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = root / f"users{suffix}"
        data.write_bytes(content)
        out = root / "out"
        args = [command, "--tiny", "--data", data, "--out", out, "--describer", "template"]
        extra = {"fit": ["--layer", "1"], "eval": ["--layer", "1", "--no-generations"]}
        result = invoke(*args, *extra.get(command, []))
        check_clean(result, root, {data}, out)


NUMBER = st.one_of(
    st.integers(-1, 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["x", "", "1e400", "-0", "0,1", "1:2", "1,nan"]),
)
OPTIONS = {
    "fit": ["--users", "--layer", "--alpha", "--backbone", "--describer", "--mode"],
    "eval": ["--users", "--layer", "--alpha", "--alphas", "--r", "--max-history"],
    "sweep": ["--users", "--alphas", "--rs", "--layers", "--n-validation"],
    "attribute": ["--users", "--method", "--describer", "--layer"],
}
WORDS = st.sampled_from(["mean_diff", "template", "both", "baseline", "patch", "prompt", "bipo!"])


@PROPERTY
@given(data=st.data(), command=st.sampled_from(sorted(OPTIONS)))
def test_random_option_values(data: st.DataObject, command: str) -> None:
    names = st.sampled_from(OPTIONS[command])
    options = data.draw(st.dictionaries(names, st.one_of(NUMBER, WORDS), max_size=3))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        users = make_synthetic_users(n_users=2, n_history=3, n_heldout=1)
        data_file = save_users(users, root / "u.jsonl")
        args = [command, "--tiny", "--data", data_file, "--out", root / "out"]
        args += [str(part) for pair in options.items() for part in pair]
        if command in ("eval", "attribute"):
            args += ["--describer", "template"] if "--describer" not in options else []
        if command == "eval":
            args.append("--no-generations")
        check_clean(invoke(*args), root, {data_file}, root / "out")


def vector_bytes(tiny_fingerprint: str) -> st.SearchStrategy[bytes]:
    """Random bytes, or a vector file whose metadata lost, gained or changed a key."""
    from safetensors.torch import save

    base = SteeringVector(torch.ones(64), "blocks.1.hook_resid_post", tiny_fingerprint).metadata()

    def build(change: tuple[str, Any, str]) -> bytes:
        key, value, dtype = change
        meta = dict(base)
        if value == "<drop>":
            meta.pop(key, None)
        else:
            meta[key] = value
        tensor = torch.ones(64, dtype=getattr(torch, dtype))
        return save({"vector": tensor}, metadata={"steerx": json.dumps(meta)})

    changes = st.tuples(
        st.sampled_from([*base, "future_key"]),
        st.one_of(st.just("<drop>"), st.none(), st.integers(-2, 100), st.floats(), st.text()),
        st.sampled_from(["float32", "float16", "int64"]),
    )
    unchanged = st.just(("future_key", "<drop>", "float32"))
    return st.one_of(st.binary(max_size=200), changes.map(build), unchanged.map(build))


@PROPERTY
@given(data=st.data())
def test_random_vector_files_and_generate_options(data: st.DataObject, tiny: Any) -> None:
    content = data.draw(vector_bytes(get_adapter(tiny).fingerprint()))
    options = data.draw(
        st.dictionaries(st.sampled_from(["--alpha", "--max-new-tokens"]), NUMBER, max_size=2)
    )
    prompt = data.draw(st.text(max_size=20))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        vector = root / "v.safetensors"
        vector.write_bytes(content)
        args = ["generate", "--tiny", "--vector", vector, "--prompt", prompt]
        args += [str(part) for pair in options.items() for part in pair]
        check_clean(invoke(*args), root, {vector}, None)
