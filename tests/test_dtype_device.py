"""Large-model readiness on CPU: fp16/bf16 models on every backend, devices, sizes from the model.

The tiny model is loaded in half precision; fp32 vectors must steer it (cast inside the hook),
scores come back in float32, activations in the model's dtype, and the pipeline still yields
fp32 vectors close to the fp32 model's. CUDA runs are checked when a GPU is present.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.backends import BACKENDS, get_adapter
from steerx_lens.data import make_synthetic_users
from steerx_lens.errors import ContextLengthError, SteerXError
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import SteerX, SteerXConfig

PROMPTS = ["Hello world, how are you?", "Cheers, Sam!"]
SITE = "blocks.1.hook_resid_pre"
HALF = {"bf16": (torch.bfloat16, 0.05), "fp16": (torch.float16, 0.01)}  # dtype, score tolerance


def steer(device: str = "cpu") -> hooks.Steer:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(device)
    return hooks.Steer(SITE, vector)


def gap(a: hooks.TokenScores, b: hooks.TokenScores, model: Any) -> float:
    """Largest log-prob difference over real (non-padding) positions."""
    mask = get_adapter(model).encode(PROMPTS).attention_mask.bool().cpu()
    real = mask[:, :-1] & mask[:, 1:]
    return float((a.logp.cpu() - b.logp.cpu()).abs()[real].max())


@pytest.fixture(scope="module")
def fp32() -> Any:
    return load_tiny_model("hf")


@pytest.mark.parametrize("precision", sorted(HALF))
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_models_steer_with_fp32_vectors(
    backend: str, precision: str, fp32: Any
) -> None:
    dtype, tolerance = HALF[precision]
    model = load_tiny_model(backend, dtype=dtype)
    scores = hooks.score_tokens(model, PROMPTS, steer())
    reference = hooks.score_tokens(fp32, PROMPTS, steer())
    assert scores.logp.dtype == torch.float32
    assert gap(scores, reference, fp32) <= tolerance
    unsteered = hooks.score_tokens(model, PROMPTS)
    assert gap(scores, unsteered, fp32) > 10 * tolerance  # the steer acted
    acts = hooks.activations(model, PROMPTS, [SITE], steer())[SITE]
    assert acts.dtype == dtype
    generated = hooks.generate(model, PROMPTS, steer(), max_new_tokens=4)
    assert generated.new_tokens.shape == (2, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_backends_agree_with_hf(backend: str) -> None:
    """Same dtype, same numbers: backends differ from HF only by their own rounding."""
    hf = load_tiny_model("hf", dtype=torch.bfloat16)
    scores = hooks.score_tokens(load_tiny_model(backend, dtype=torch.bfloat16), PROMPTS, steer())
    assert gap(scores, hooks.score_tokens(hf, PROMPTS, steer()), hf) <= 2e-2


def test_pipeline_on_bf16_gives_fp32_vectors_close_to_the_fp32_model(fp32: Any) -> None:
    users = make_synthetic_users(n_users=3, n_history=3, n_heldout=1, seed=0)
    config = SteerXConfig(layer=1, answer_tokens=6, max_context_tokens=256)
    half = load_tiny_model("hf", dtype=torch.bfloat16)
    fits = [SteerX(m, config, progress=False).fit_many(users) for m in (fp32, half)]
    for user_id, full in fits[0].users.items():
        low = fits[1].users[user_id]
        for mode in ("baseline", "steerx"):
            a, b = getattr(full, mode).vector, getattr(low, mode).vector
            assert b.dtype == torch.float32 and torch.isfinite(b).all()
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


@pytest.mark.parametrize("n_layers,d_model", [(3, 32), (2, 64)])
def test_sizes_and_default_layer_come_from_the_model(n_layers: int, d_model: int) -> None:
    for backend in ("hf", "nnsight"):
        model = load_tiny_model(backend, n_layers=n_layers, d_model=d_model)
        adapter = get_adapter(model)
        assert (adapter.n_layers, adapter.d_model) == (n_layers, d_model)
        pipeline = SteerX(model, SteerXConfig(), progress=False)
        assert pipeline.config.layer == round(0.4 * n_layers)
    assert SteerXConfig().for_model(30).layer == 12  # the demo model's validated default


@pytest.mark.parametrize("backend", ["hf", "nnsight"])
def test_device_map_loading_matches(backend: str, fp32: Any) -> None:
    model = load_tiny_model(backend, device_map={"": "cpu"})  # accelerate's placement path
    scores = hooks.score_tokens(model, PROMPTS, steer())
    assert gap(scores, hooks.score_tokens(fp32, PROMPTS, steer()), fp32) <= 1e-5


def test_device_map_is_refused_where_unsupported() -> None:
    with pytest.raises(ValueError, match="device_map"):
        load_tiny_model("transformer_lens", device_map="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [*BACKENDS, "nnsight_remote_simulated"])
def test_cuda_model_matches_cpu(backend: str, fp32: Any) -> None:
    model = load_tiny_model(backend.removesuffix("_remote_simulated"), device="cuda")
    adapter = get_adapter(model, remote="local" if backend.endswith("_simulated") else None)
    assert adapter.embedding_weight().device.type == "cuda"
    scores = hooks.score_tokens(model, PROMPTS, steer())  # a CPU vector on a CUDA model
    reference = hooks.score_tokens(fp32, PROMPTS, steer())
    assert gap(scores, reference, fp32) <= 1e-3
    generated = hooks.generate(model, PROMPTS, steer(), max_new_tokens=4).sequences.cpu()
    assert torch.equal(
        generated, hooks.generate(fp32, PROMPTS, steer(), max_new_tokens=4).sequences
    )
    users = make_synthetic_users(n_users=3, n_history=2, n_heldout=1, seed=0)
    config = SteerXConfig(layer=1, answer_tokens=4, max_context_tokens=128)
    on_gpu = SteerX(model, config, progress=False).fit_many(users)
    on_cpu = SteerX(fp32, config, progress=False).fit_many(users)
    for user_id, expected in on_cpu.users.items():
        vector = on_gpu.users[user_id].steerx.vector
        assert vector.device.type == "cpu"  # vectors always come back to the CPU
        assert torch.nn.functional.cosine_similarity(vector, expected.steerx.vector, dim=0) > 0.99


def test_inputs_longer_than_the_context_are_refused() -> None:
    model = load_tiny_model("transformer_lens")  # its rotary tables stop at n_ctx
    adapter = get_adapter(model)
    assert adapter.max_positions == 1024
    too_long = torch.ones(1, 1025, dtype=torch.long)
    with pytest.raises(ContextLengthError, match="1025 tokens but the model's context is 1024"):
        hooks.score_tokens(model, too_long)
    with pytest.raises(ContextLengthError, match="prompt \\+ new tokens"):
        hooks.generate(model, torch.ones(1, 1020, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(SteerXError, match="max_context_tokens=2048 exceeds"):
        SteerX(model, SteerXConfig(max_context_tokens=2048), progress=False)
