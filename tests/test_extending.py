"""Extending steerx_lens from outside the package: the worked examples of docs/architecture.md.

Each ``# example: NAME`` code block of the page is run here, so the page cannot drift from the
code; the tests around them check what the examples only sketch (every backend, the registry,
layouts, compatibility patches).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import steerx_lens.backends as backends
import steerx_lens.hooks as hooks
from steerx_lens.backends import available_backends, patches
from steerx_lens.backends.hf import make_adapter as make_hf_adapter
from steerx_lens.backends.layout import ModuleLayout, register_layout, resolve_layout
from steerx_lens.errors import BackendError
from steerx_lens.models import load_tiny_model

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
_BLOCK = re.compile(r"```python\n# example: (?P<name>[\w-]+)\n(?P<code>.*?)```", re.S)


def examples() -> dict[str, str]:
    """The page's runnable examples by name."""
    return {m["name"]: m["code"] for m in _BLOCK.finditer(PAGE.read_text(encoding="utf-8"))}


def run_example(name: str) -> dict:
    namespace: dict = {"__name__": f"example_{name}"}
    exec(compile(examples()[name], f"{PAGE.name}:{name}", "exec"), namespace)
    return namespace


def test_the_page_has_every_example() -> None:
    assert {"intervention", "backend", "backend-use", "backbone", "data-source"} <= set(examples())


def test_custom_intervention_example_runs() -> None:
    run_example("intervention")


@pytest.mark.parametrize("backend", available_backends())
def test_custom_intervention_gives_the_same_logits_on_every_backend(backend: str) -> None:
    clamp = run_example("intervention")["Clamp"]("blocks.1.hook_resid_mid", 0.05)
    texts = ["Hello world, cheers", "Hi"]
    reference = load_tiny_model("hf")
    expected = hooks.run(reference, texts, clamp)
    got = hooks.run(load_tiny_model(backend), texts, clamp)
    real = backends.get_adapter(reference).encode(texts).attention_mask.bool()  # not padding
    assert got.shape == expected.shape
    assert torch.allclose(got[real], expected[real], atol=1e-4)
    assert not torch.allclose(got[real], hooks.run(load_tiny_model(backend), texts)[real])


def test_custom_intervention_composes_and_steers_generation() -> None:
    clamp = run_example("intervention")["Clamp"]("blocks.0.hook_resid_post", 1e-3)
    model = load_tiny_model("hf")
    steer = hooks.Steer("blocks.0.hook_resid_post", torch.full((64,), 5.0))
    # order at one site matters: clamping after the steer removes most of it
    steered_then_clamped = hooks.run(model, ["Hello"], steer, clamp)
    assert not torch.allclose(steered_then_clamped, hooks.run(model, ["Hello"], clamp, steer))
    plain = hooks.generate(model, ["Hello"], max_new_tokens=6).sequences
    clamped = hooks.generate(model, ["Hello"], clamp, max_new_tokens=6).sequences
    assert not torch.equal(plain, clamped)


def test_an_object_without_site_is_refused_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match="not an intervention"):
        hooks.run(load_tiny_model("hf"), ["Hello"], lambda act, ctx: act)  # type: ignore[arg-type]


def test_backend_example_registers_and_runs(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "wrapped_backend.py").write_text(examples()["backend"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    monkeypatch.setattr(backends, "DETECTION_ORDER", backends.DETECTION_ORDER)
    run_example("backend-use")
    assert backends.DETECTION_ORDER[0] == "wrapped"
    assert backends.get_adapter(load_tiny_model("hf")).name == "hf"  # others still detected
    sys.modules.pop("wrapped_backend", None)


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown backend 'nope'.*'hf'"):
        backends.load_model("/nowhere", "nope")


def test_a_registered_layout_finds_renamed_modules(monkeypatch) -> None:
    model = load_tiny_model("hf")
    steer = hooks.Steer("blocks.1.hook_mlp_out", torch.ones(64))
    reference = hooks.run(model, ["Hello world"], steer)
    for layer in model.model.layers:  # the MLP under a second name, as another family calls it
        layer.feed_forward = layer.mlp
    monkeypatch.setattr("steerx_lens.backends.layout.LAYOUTS", {})
    register_layout(model.config.model_type, ModuleLayout(mlp=("ffn", "feed_forward")))
    adapter = make_hf_adapter(model, backends.get_adapter(model).tokenizer)
    assert adapter.layout.mlp == "feed_forward"
    assert torch.allclose(hooks.run(adapter, ["Hello world"], steer), reference, atol=1e-6)
    register_layout(model.config.model_type, ModuleLayout(mlp=("ffn",)))
    with pytest.raises(BackendError, match="register_layout"):
        resolve_layout(model)


def test_patches_are_listed_and_can_be_switched_off() -> None:
    assert set(patches.PATCHES) == {"bridge_kv_cache", "tl_weight_layout"}
    with pytest.raises(ValueError, match="unknown compatibility patch"):
        patches.disable("nope")
    bridge = load_tiny_model("bridge")
    expected = hooks.generate(bridge, ["Hello"], max_new_tokens=4).sequences
    patches.disable("bridge_kv_cache")
    try:
        with pytest.raises(BackendError, match="bridge_kv_cache"):
            hooks.generate(bridge, ["Hello"], max_new_tokens=4)
        hooks.run(bridge, ["Hello"])  # forward passes do not need the patch
    finally:
        patches.enable("bridge_kv_cache")
    assert torch.equal(hooks.generate(bridge, ["Hello"], max_new_tokens=4).sequences, expected)


@pytest.mark.skipif(
    "transformer_lens" not in available_backends(), reason="HookedTransformer needs TL 3.x"
)
def test_weight_layout_patch_changes_layout_not_values() -> None:
    patches.disable("tl_weight_layout")
    try:
        as_loaded = load_tiny_model("transformer_lens")
        assert not as_loaded.W_U.T.is_contiguous()
        logits = hooks.run(as_loaded, ["Hello world"])
    finally:
        patches.enable("tl_weight_layout")
    relaid = load_tiny_model("transformer_lens")
    assert relaid.W_U.T.is_contiguous()
    assert torch.allclose(hooks.run(relaid, ["Hello world"]), logits, atol=1e-6)


def test_data_source_example_registers_a_source(monkeypatch) -> None:
    import steerx_lens.data.sources as sources

    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    run_example("data-source")
    assert "notes" in sources.SOURCES
    users = sources.load_users("notes", 1)
    assert [u.user_id for u in users] == ["ann"]
    assert users[0].heldout[0].output == "Autumn, obviously. Cheers, Ann!"


def test_backbone_example_runs_through_steerx(monkeypatch) -> None:
    import steerx_lens.backbones as backbones

    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))
    namespace = run_example("backbone")
    fitted = next(iter(namespace["fit"].users.values()))
    if fitted.steerx.extra["fallback"]:  # no evidence: the anchor (the user's baseline)
        assert torch.equal(fitted.baseline.vector, fitted.steerx.vector)
    else:
        assert not torch.equal(fitted.baseline.vector, fitted.steerx.vector)
