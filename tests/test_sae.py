"""The SAE backbone: offline SAELens training + cache, projection, feature steering, activations."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steerx_lens import hooks
from steerx_lens.backbones import sae_training
from steerx_lens.backbones.mean_diff import mean_diff_backbone
from steerx_lens.backbones.sae import (
    FINGERPRINT_KEY,
    SAELoadError,
    attribution_scores,
    check_sae_fits,
    explained_variance,
    feature_activations,
    feature_steering_vector,
    load_sae,
    project_vector,
    sae_backbone,
    top_features,
)
from steerx_lens.backbones.sae_training import train_demo_sae
from steerx_lens.backends import get_adapter
from steerx_lens.data import load_users, make_synthetic_users
from steerx_lens.errors import BackendError, ModelMismatchError, UnknownSiteError, VectorShapeError
from steerx_lens.models import load_demo_model, load_tiny_model

SITE = "blocks.1.hook_resid_post"
TINY: dict[str, Any] = {
    "layer": 1,
    "d_sae": 128,
    "n_tokens": 4096,
    "context_size": 32,
    "batch_tokens": 128,
}
TEXTS = ["Cheers, Sam! I love hoppy beers.", "Health news: sleep well."]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core CPU, two threads make these tiny runs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sae_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private folder for the SAEs trained by this module."""
    return tmp_path_factory.mktemp("sae_cache")


@pytest.fixture(scope="module")
def tiny(one_thread: None) -> Any:
    return load_tiny_model("transformer_lens")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    users = make_synthetic_users(n_users=6, n_history=30, n_heldout=0)
    return [f"{item.input} {item.output}" for user in users for item in user.history]


@pytest.fixture(scope="module")
def sae(tiny: Any, corpus: list[str], sae_cache: Path) -> Any:
    """A tiny SAE trained by the real SAELens runner (into the module's private cache)."""
    return train_demo_sae(**TINY, model=tiny, corpus=corpus, cache=sae_cache)


def cached_folder(sae_cache: Path) -> Path:
    (folder,) = [p for p in sae_cache.iterdir() if not p.name.startswith(".")]
    return folder


def identity_sae(d_model: int, site: str) -> StandardSAE:
    """A ReLU SAE that reconstructs exactly: features relu(x) and relu(-x), decoder [I; -I]."""
    cfg = StandardSAEConfig(d_in=d_model, d_sae=2 * d_model)
    cfg.metadata.hook_name = site
    sae = StandardSAE(cfg)
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------------------ training, cache


def test_training_is_cached_and_reloads_identically(
    sae: Any, tiny: Any, corpus: list[str], sae_cache: Path
) -> None:
    assert sae.cfg.d_sae == 128 and sae.cfg.d_in == 64
    assert sae.cfg.metadata.hook_name == SITE
    assert sae.cfg.metadata[FINGERPRINT_KEY] == get_adapter(tiny).fingerprint()
    folder = cached_folder(sae_cache)
    assert not [p for p in sae_cache.iterdir() if p.name.startswith(".")]  # no temp
    weights = folder / "sae_weights.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = train_demo_sae(**TINY, model=tiny, corpus=corpus, cache=sae_cache)
    assert weights.stat().st_mtime_ns == mtime  # loaded, not re-trained
    assert torch.equal(again.W_dec, sae.W_dec)
    assert torch.equal(load_sae(folder).W_dec, sae.W_dec)


def test_other_settings_get_their_own_cache_entry(
    sae: Any, tiny: Any, corpus: list[str], sae_cache: Path
) -> None:
    other = train_demo_sae(**{**TINY, "seed": 1}, model=tiny, corpus=corpus, cache=sae_cache)
    folders = [p for p in sae_cache.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 2
    assert not torch.equal(other.W_dec, sae.W_dec)
    shutil.rmtree(max(folders, key=lambda p: p.stat().st_mtime_ns))


def test_force_and_corrupt_cache_retrain_atomically(
    sae: Any, tiny: Any, corpus: list[str], sae_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    weights = cached_folder(sae_cache) / "sae_weights.safetensors"
    weights.write_bytes(b"not safetensors")
    # a corrupt entry is re-trained
    repaired = train_demo_sae(**TINY, model=tiny, corpus=corpus, cache=sae_cache)
    assert torch.equal(repaired.W_dec, sae.W_dec)  # same seed, same SAE
    mtime = weights.stat().st_mtime_ns
    forced = train_demo_sae(**TINY, model=tiny, corpus=corpus, cache=sae_cache, force=True)
    assert weights.stat().st_mtime_ns != mtime
    assert torch.equal(forced.W_dec, sae.W_dec)
    assert [p.name for p in sae_cache.iterdir()] == [weights.parent.name]
    assert "WANDB_MODE" not in os.environ  # set only while SAELens trained


def test_training_environment_is_restored_and_keeps_the_users_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with sae_training._environment(sae_training.TRAINING_ENVIRONMENT):
        assert os.environ["WANDB_MODE"] == "disabled"
        assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert "WANDB_MODE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"


def test_cache_serves_every_backend_but_training_needs_hooked_transformer(
    sae: Any, corpus: list[str], sae_cache: Path
) -> None:
    hf_model = load_tiny_model("hf")
    cached = train_demo_sae(**TINY, model=hf_model, corpus=corpus, cache=sae_cache)
    assert torch.equal(cached.W_dec, sae.W_dec)  # same fingerprint on every backend
    with pytest.raises(BackendError, match="transformer_lens"):
        train_demo_sae(**TINY, model=hf_model, corpus=corpus, cache=sae_cache, force=True)
    assert torch.equal(load_sae(cached_folder(sae_cache)).W_dec, sae.W_dec)  # cache intact


def test_load_sae_errors(tmp_path: Path, sae: Any, sae_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        load_sae(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(cached_folder(sae_cache), broken)
    (broken / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match="corrupt"):
        load_sae(broken)
    (broken / "cfg.json").unlink()
    with pytest.raises(SAELoadError, match="missing cfg.json"):
        load_sae(broken)


def test_check_sae_fits(sae: Any, tiny: Any, sae_cache: Path) -> None:
    check_sae_fits(sae, tiny, SITE)
    with pytest.raises(ModelMismatchError, match="trained on 'blocks.1.hook_resid_post'"):
        check_sae_fits(sae, tiny, "blocks.0.hook_resid_post")
    with pytest.raises(UnknownSiteError):
        check_sae_fits(sae, tiny, "blocks.7.hook_resid_post")
    with pytest.raises(VectorShapeError, match="d_model is 64"):
        check_sae_fits(identity_sae(32, SITE), tiny, SITE)
    other_model = load_sae(cached_folder(sae_cache))
    other_model.cfg.metadata[FINGERPRINT_KEY] = "2x64:0000000000000000"
    with pytest.raises(ModelMismatchError, match="trained on model"):
        check_sae_fits(other_model, tiny, SITE)
    with pytest.raises(ModelMismatchError):
        feature_activations(tiny, sae, TEXTS, site="blocks.0.hook_resid_post")


# ------------------------------------------------------------------------------ projection


def test_projection_recovers_a_sparse_combination(sae: Any) -> None:
    decoder = sae.W_dec.detach()
    planted = {7: 3.0, 40: -2.0, 101: 1.5}
    vector = sum(c * decoder[f] for f, c in planted.items())
    proj = project_vector(vector, sae, k=3)
    assert sorted(proj.features.tolist()) == sorted(planted)
    assert proj.explained > 1 - 1e-6
    for feature, coefficient in zip(
        proj.features.tolist(), proj.coefficients.tolist(), strict=True
    ):
        assert coefficient == pytest.approx(planted[feature], rel=1e-4)
    torch.testing.assert_close(proj.vector, vector, atol=1e-4, rtol=1e-4)
    assert proj.features[0] == 7  # sorted by share of the vector, largest first


def test_projection_respects_k(sae: Any) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    explained = []
    for k in (1, 4, 16):
        proj = project_vector(vector, sae, k=k)
        assert proj.features.shape == proj.coefficients.shape == (k,)
        assert len(set(proj.features.tolist())) == k
        recon = proj.coefficients @ sae.W_dec.detach()[proj.features]
        torch.testing.assert_close(recon, proj.vector, atol=1e-4, rtol=1e-4)
        explained.append(proj.explained)
    assert explained == sorted(explained) and explained[0] < explained[-1]
    full = project_vector(vector, sae, k=10_000)  # capped; stops once exact
    assert full.features.numel() <= 128 and full.explained > 0.999
    with pytest.raises(ValueError, match="k must be"):
        project_vector(vector, sae, k=0)
    with pytest.raises(VectorShapeError):
        project_vector(torch.ones(32), sae)


def test_projection_by_attribution_uses_the_scores(sae: Any) -> None:
    decoder = sae.W_dec.detach()
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    scores = torch.zeros(128)
    scores[[5, 17, 90, 3]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    proj = project_vector(vector, sae, k=3, by="attribution", feature_scores=scores)
    assert proj.features.tolist() == [5, 17, 90]
    # least squares on the chosen rows: what is left is orthogonal to each of them
    residual = vector - proj.vector
    assert (decoder[proj.features] @ residual).abs().max() < 1e-4
    with pytest.raises(ValueError, match="feature_scores"):
        project_vector(vector, sae, k=3, by="attribution")
    with pytest.raises(VectorShapeError):
        project_vector(vector, sae, by="attribution", feature_scores=torch.ones(5))


def test_sae_backbone_by_attribution_keeps_the_features_the_chosen_side_raises(
    tiny: Any,
) -> None:
    """With an exact identity SAE, feature i is relu(x_i) and feature d + i is relu(-x_i): the
    attribution choice keeps the coordinates the chosen texts raise most, the magnitude choice
    the largest coordinates of the vector, and both are exact on what they keep."""
    exact = identity_sae(64, SITE)
    chosen, rejected = TEXTS, ["Plain text here.", "Another plain one."]
    scores = attribution_scores(tiny, SITE, exact, chosen, rejected)
    assert scores.shape == (128,) and torch.isfinite(scores).all()
    vector = mean_diff_backbone(tiny, SITE, chosen, rejected)
    by_scores = sae_backbone(tiny, SITE, chosen, rejected, sae=exact, sae_k=3, sae_by="attribution")
    by_size = sae_backbone(tiny, SITE, chosen, rejected, sae=exact, sae_k=3)
    kept = sorted({int(f) % 64 for f in scores.topk(3).indices})
    assert sorted(by_scores.nonzero().flatten().tolist()) == kept
    torch.testing.assert_close(by_scores[kept], vector[kept])
    largest = sorted(vector.abs().topk(3).indices.tolist())
    assert sorted(by_size.nonzero().flatten().tolist()) == largest


# ------------------------------------------------------------------------------ steering


def test_feature_steering_vector_steers(sae: Any, tiny: Any) -> None:
    vector = feature_steering_vector(sae, [3, 9], weights=[2.0, -1.0])
    assert vector.shape == (64,) and torch.isfinite(vector).all()
    rows = sae.W_dec.detach()[[3, 9]]
    expected = 2 * rows[0] / rows[0].norm() - rows[1] / rows[1].norm()
    torch.testing.assert_close(vector, expected)
    assert feature_steering_vector(sae, [3]).norm() == pytest.approx(1.0)
    base = hooks.run(tiny, TEXTS)
    steered = hooks.run(tiny, TEXTS, hooks.Steer(SITE, vector, alpha=4.0))
    assert (steered - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        feature_steering_vector(sae, [128])
    with pytest.raises(ValueError, match="weights"):
        feature_steering_vector(sae, [1, 2], weights=[1.0])


# ------------------------------------------------------------------------------ activations


def test_feature_activations_mask_padding_and_match_the_sae(tiny: Any) -> None:
    sae = identity_sae(64, SITE)
    acts = feature_activations(tiny, sae, TEXTS)
    lengths = [len(get_adapter(tiny).tokenizer(t)["input_ids"]) for t in TEXTS]
    assert acts.shape == (2, max(lengths), 128)
    _, store = hooks.cache(tiny, TEXTS, [SITE], padding_side="right")
    x = store[SITE]
    expected = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)
    short = lengths.index(min(lengths))
    torch.testing.assert_close(acts[short, 1 : min(lengths)], expected[short, 1 : min(lengths)])
    assert (acts[short, min(lengths) :] == 0).all()  # padding
    assert (acts[:, 0] == 0).all()  # each row's first token (attention sink)
    with_first = feature_activations(tiny, sae, TEXTS, skip_first=False)
    torch.testing.assert_close(with_first[:, 0], expected[:, 0])


def test_explained_variance_of_an_exact_sae_is_one(tiny: Any, sae: Any) -> None:
    assert explained_variance(tiny, identity_sae(64, SITE), TEXTS) == pytest.approx(1.0, abs=1e-5)
    assert explained_variance(tiny, sae, TEXTS) < 1 - 1e-3


def test_top_features_rank_by_mean_activation() -> None:
    acts = torch.zeros(2, 3, 6)
    acts[0, 1, 4] = 5.0
    acts[1, 2, 2] = 3.0
    acts[1, 0, 1] = 10.0
    assert top_features(acts, k=2).tolist() == [1, 4]
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    assert top_features(acts, mask, k=2).tolist() == [4, 2]
    with pytest.raises(ValueError, match="no positions"):
        top_features(acts, torch.zeros(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------ demo model


@pytest.mark.demo
def test_demo_sae_reconstructs_heldout_tweets(one_thread: None) -> None:
    """Train (or load) a small SAE at layer 12 of the demo model; report quality on held-out text."""
    model = load_demo_model("transformer_lens")
    assert sae_training._demo_fingerprint() == get_adapter(model).fingerprint()
    start = time.perf_counter()
    sae = train_demo_sae(12, d_sae=1024, n_tokens=50_000, model=model)
    seconds = time.perf_counter() - start
    heldout = sae_training.heldout_corpus()[:96]
    ev = explained_variance(model, sae, heldout)
    acts = feature_activations(model, sae, heldout[:16])
    real = acts.abs().sum(-1) > 0
    l0 = float((acts[real] > 0).float().sum(-1).mean())
    print(
        f"\n[demo SAE] train/load {seconds:.1f} s (training took "
        f"{sae.cfg.metadata['steerx_train_seconds']} s), held-out explained variance {ev:.3f}, "
        f"L0 {l0:.1f}"
    )
    assert ev >= 0.5
    assert 1 <= l0 <= 300
    # a realistic steering direction: mean activation of one account's tweets minus another's
    site = "blocks.12.hook_resid_post"
    users = {u.user_id: u for u in load_users("health_tweets", n_history=8, n_heldout=1)}
    means = []
    for account in ("bbchealth", "goodhealth"):
        tweets = [item.output for item in users[account].history]
        means.append(torch.cat(list(mean_activations(model, tweets, site))).mean(0))
    direction = means[0] - means[1]
    explained = {k: project_vector(direction, sae, k=k).explained for k in (4, 32)}
    print(f"[demo SAE] account-difference vector explained by 4 / 32 features: {explained}")
    assert explained[4] < explained[32] < 1
    vector = feature_steering_vector(sae, top_features(acts, k=3).tolist())
    base = hooks.run(model, heldout[:2])
    steered = hooks.run(model, heldout[:2], hooks.Steer(site, 8.0 * vector))
    assert (steered - base).abs().max() > 1e-2


def mean_activations(model: Any, texts: list[str], site: str) -> Iterator[torch.Tensor]:
    """Per-text mean activation at ``site`` over real tokens after the first."""
    _, store = hooks.cache(model, texts, [site], padding_side="right")
    mask = get_adapter(model).encode(texts, padding_side="right").attention_mask.bool()
    for row, keep in zip(store[site], mask, strict=True):
        yield row[keep][1:].mean(0, keepdim=True)
