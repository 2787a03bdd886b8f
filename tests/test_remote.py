"""Remote execution through nnsight: the offline simulation matches HF, and failures are clear.

Everything runs without a network: ``remote="local"`` is nnsight's own serialize → hide local
modules → deserialize → run simulation of an NDIF request; the network failures go to a closed
port or to a local HTTP server that answers like a rejecting NDIF.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError
from nnsight.modeling import huggingface

from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.backends.remote import (
    RemoteConfigError,
    RemoteExecutionError,
    RemoteModelError,
    load_remote_model,
    translate,
)
from steerx_lens.data import make_synthetic_users
from steerx_lens.errors import BackendError
from steerx_lens.evaluation.experiment import Experiment
from steerx_lens.models import build_tiny_model_dir, load_tiny_model
from steerx_lens.pipeline import SteerXConfig

PROMPTS = ["Hello world, how are you?", "Cheers"]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SRC = Path(__file__).resolve().parents[1] / "src"


def steer() -> hooks.Steer:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    return hooks.Steer("blocks.1.hook_resid_pre", vector, positions="prompt_last_and_generated")


@pytest.fixture(scope="module")
def hf() -> Any:
    return load_tiny_model("hf")


@pytest.fixture
def simulated() -> Any:
    model = load_tiny_model("nnsight")
    get_adapter(model, remote="local")
    return model


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


@pytest.fixture
def with_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NDIF_API_KEY", "test-key")


@pytest.fixture
def hub_named(with_key: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tiny model named as if it had been loaded by hub id (its hub lookup cached)."""
    model = load_tiny_model("nnsight")
    model.repo_id = HUB_ID
    monkeypatch.setitem(huggingface._ID_CACHE, HUB_ID, HUB_ID)
    return model


@pytest.fixture(scope="module")
def fake_ndif() -> Iterator[tuple[str, dict[str, int]]]:
    """A local HTTP server answering every request with ``state["status"]`` and a JSON detail."""
    state = {"status": 401}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"detail": "rejected by the test server"}).encode()
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()


# ------------------------------------------------------------------ simulation matches HF


def test_simulated_remote_matches_hf(simulated: Any, hf: Any) -> None:
    scores = hooks.score_tokens(simulated, PROMPTS, steer())
    reference = hooks.score_tokens(hf, PROMPTS, steer())
    assert (scores.logp - reference.logp).abs().max() <= 1e-5
    assert torch.equal(scores.top, reference.top)
    site = "blocks.0.hook_resid_mid"
    acts = hooks.activations(simulated, PROMPTS, [site], steer())[site]
    assert (acts - hooks.activations(hf, PROMPTS, [site], steer())[site]).abs().max() <= 1e-5
    generated = hooks.generate(simulated, PROMPTS, steer(), max_new_tokens=6).sequences
    assert torch.equal(generated, hooks.generate(hf, PROMPTS, steer(), max_new_tokens=6).sequences)
    assert get_adapter(simulated).fingerprint() == get_adapter(hf).fingerprint()


def test_captures_come_back_as_saved_values_not_side_effects(simulated: Any, hf: Any) -> None:
    """Capture inside a (simulated) remote trace fills the caller's store with the right values."""
    logits, store = hooks.cache(simulated, PROMPTS, ["blocks.1.hook_resid_post"])
    reference_logits, reference = hooks.cache(hf, PROMPTS, ["blocks.1.hook_resid_post"])
    assert (logits - reference_logits).abs().max() <= 1e-5
    site = "blocks.1.hook_resid_post"
    assert (store[site] - reference[site]).abs().max() <= 1e-5


def test_remote_generation_refuses_capture(simulated: Any) -> None:
    with pytest.raises(BackendError, match="Capture during remote generation"):
        hooks.generate(simulated, PROMPTS, hooks.Capture("blocks.0.hook_resid_post"))


def test_meta_loaded_model_runs_and_fingerprints_through_the_remote_path(hf: Any) -> None:
    """``load_remote_model`` builds the model without weights; the fingerprint needs a trace."""
    model = load_remote_model(str(build_tiny_model_dir()), remote="local")
    assert model._module.get_input_embeddings().weight.device.type == "meta"
    assert get_adapter(model).fingerprint() == get_adapter(hf).fingerprint()
    scores = hooks.score_tokens(model, PROMPTS, steer())
    assert (scores.logp - hooks.score_tokens(hf, PROMPTS, steer()).logp).abs().max() <= 1e-5


def test_library_code_is_shipped_by_value(tmp_path: Path) -> None:
    """In a strict simulation (steerx_lens importable only from a hidden folder) calls succeed,
    and fail with ModuleNotFoundError when the library is not registered for by-value pickling.
    """
    script = f"""
import os, sys
sys.path[:] = [p for p in sys.path if p != {str(SRC)!r}]
sys.path.insert(0, sys.argv[1])
import torch
import steerx_lens
assert steerx_lens.__file__.startswith(sys.argv[1]), steerx_lens.__file__
from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.models import load_tiny_model
model = load_tiny_model("nnsight")
get_adapter(model, remote="local")
if sys.argv[2] == "unregistered":
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    _PICKLE_BY_VALUE_MODULES.discard("steerx_lens")
steer = hooks.Steer("blocks.1.hook_resid_pre", torch.ones(64))
scores = hooks.score_tokens(model, ["Hello world"], steer)
print("OK", tuple(scores.logp.shape))
"""
    hidden = tmp_path / "user_code"  # a folder the simulation hides, like a laptop's checkout
    hidden.mkdir()
    os.symlink(SRC / "steerx_lens", hidden / "steerx_lens")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = {}
    for mode in ("registered", "unregistered"):
        runs[mode] = subprocess.run(
            [sys.executable, "-c", script, str(hidden), mode],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    assert runs["registered"].returncode == 0, runs["registered"].stderr[-3000:]
    assert runs["registered"].stdout.startswith("OK (1, ")
    assert runs["unregistered"].returncode != 0
    assert "No module named 'steerx_lens'" in runs["unregistered"].stderr


# ------------------------------------------------------------------ errors


def test_missing_api_key_is_a_config_error(no_key: None) -> None:
    model = load_tiny_model("nnsight")
    with pytest.raises(RemoteConfigError, match="NDIF_API_KEY"):
        get_adapter(model, remote=True)
    with pytest.raises(RemoteConfigError, match="NDIF_API_KEY"):
        load_remote_model(HUB_ID, remote=True)


def test_bad_remote_argument_and_non_nnsight_model(hf: Any) -> None:
    with pytest.raises(RemoteConfigError, match="remote must be"):
        get_adapter(load_tiny_model("nnsight"), remote="ndif.example.org")
    with pytest.raises(BackendError, match="needs an nnsight model"):
        get_adapter(hf, remote="local")


def test_unknown_model_id_is_a_model_error(with_key: None) -> None:
    with pytest.raises(RemoteModelError, match="no-such-org/no-such-model"):
        load_remote_model("no-such-org/no-such-model", remote=True)


def test_local_folder_model_cannot_go_to_ndif(with_key: None) -> None:
    with pytest.raises(RemoteModelError, match="local folder"):
        get_adapter(load_tiny_model("nnsight"), remote=True)


def test_unreachable_host_is_an_execution_error_and_writes_nothing(
    hub_named: Any, tmp_path: Path
) -> None:
    get_adapter(hub_named, remote="http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(RemoteExecutionError, match="could not reach NDIF at http://127.0.0.1:9"):
        hooks.score_tokens(hub_named, PROMPTS)
    users = make_synthetic_users(n_users=2, n_history=2, n_heldout=1, seed=0)
    config = SteerXConfig(layer=1, answer_tokens=4, max_context_tokens=128)
    out = tmp_path / "run"
    with pytest.raises(RemoteExecutionError):
        Experiment(hub_named, users, out, config, max_new_tokens=2, progress=False).run()
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_rejected_key_and_server_errors(hub_named: Any, fake_ndif: Any) -> None:
    url, state = fake_ndif
    get_adapter(hub_named, remote=url)
    state["status"] = 401
    with pytest.raises(RemoteConfigError, match="rejected the API key"):
        hooks.score_tokens(hub_named, PROMPTS)
    state["status"] = 503
    with pytest.raises(RemoteExecutionError, match="HTTP 503"):
        hooks.generate(hub_named, PROMPTS, max_new_tokens=2)


def test_failed_job_is_reported_as_a_server_side_failure() -> None:
    error = translate(NNsightRemoteError("CUDA out of memory"), True, "a generation")
    assert isinstance(error, RemoteExecutionError)
    assert "failed on the server: CUDA out of memory" in str(error)
    assert "remote='local'" in str(error)
    assert translate(ValueError("a bug of ours"), True, "x") is None  # not remote's: re-raised


def test_remote_gradients_are_refused(simulated: Any) -> None:
    trainable = torch.zeros(64, requires_grad=True)
    with pytest.raises(BackendError, match="gradients cannot flow back"):
        hooks.run(simulated, PROMPTS, hooks.Steer("blocks.0.hook_resid_post", trainable), grad=True)
