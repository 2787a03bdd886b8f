"""SAE backbone (optional): steering vectors expressed in, or built from, SAE features.

Three uses of a sparse autoencoder (SAELens) at one residual site:

- :func:`project_vector` rewrites a steering vector as a sparse combination of at most ``k`` SAE
  decoder directions (chosen by how much of the vector they explain, or by given per-feature
  scores such as causal attributions) and decodes it back: a denoised, interpretable vector.
- :func:`feature_steering_vector` steers directly with chosen features (sum of weighted unit
  decoder rows), ready for :class:`steerx_lens.hooks.Steer`.
- :func:`feature_activations` / :func:`top_features` show which features fire on a user's
  preference tokens.

:func:`train_demo_sae` trains a small SAE with SAELens's own ``LanguageModelSAETrainingRunner``
fully offline (local token dataset, no hub, no wandb) and caches it; :func:`load_sae` loads any
SAE saved by SAELens. ``SAE.from_pretrained`` is never called: it needs the hub.

This backbone is a reconstruction: the SteerX paper's body was not available, so how its SAE
variant picks features is not known; the choices here are documented options.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before sae_lens (and its hub clients) load
os.environ.setdefault("WANDB_MODE", "disabled")

import hashlib
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.backends import Batch, Inputs, get_adapter
from steerx_lens.errors import (
    BackendError,
    ModelMismatchError,
    NonFiniteError,
    SteerXError,
    VectorShapeError,
)
from steerx_lens.models import cache_dir, demo_model_dir, load_demo_model, weights_digest

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE

SelectBy = Literal["magnitude", "attribution"]

DEFAULT_LAYER = 12
DEFAULT_D_SAE = 2048
DEFAULT_N_TOKENS = 150_000
"""Training tokens of :func:`train_demo_sae`. The language-model forward dominates: ~2 min at
the ~1,300 tokens/s of an idle 2-core CPU; measured 272 s (~550 tokens/s) on a shared one. On the
demo model (layer 12, d_sae 2048) this gives explained variance 0.76 on held-out tweets with
~28 active features per token (50k tokens, d_sae 1024: 86 s, 0.69, ~64)."""
DEFAULT_CONTEXT_SIZE = 128
DEFAULT_L1_COEFFICIENT = 2.0
"""L1 coefficient of SAELens's standard SAE, on activations normalised to mean norm sqrt(d_in).
With :data:`DEFAULT_LR` and :data:`DEFAULT_BATCH_TOKENS`, picked by a small sweep on the demo
model for explained variance >= 0.65 at a few dozen active features per token."""
DEFAULT_LR = 3e-3
DEFAULT_BATCH_TOKENS = 256
"""Tokens per SAE optimiser step: small, so that short CPU runs still take hundreds of steps."""
DEFAULT_CORPUS_TWEETS = 1000
"""Health tweets per account (16 accounts) in the default training corpus (~290k tokens)."""
SAE_CACHE_DIRNAME = "sae"
CACHE_FORMAT = 1
"""Bumped when the training recipe changes, so that old cached SAEs are not reused."""
FINGERPRINT_KEY = "steerx_model_fingerprint"


class SAELoadError(SteerXError, ValueError):
    """A folder that should hold an SAELens SAE but is incomplete or corrupt."""


@dataclass(frozen=True)
class SAEProjection:
    """A vector rewritten in SAE decoder directions.

    ``vector = coefficients @ sae.W_dec[features]`` (the reconstruction, ``[d_model]``);
    ``coefficients`` are in SAE feature-activation units (raw decoder rows); ``features`` come
    largest share first (``|coefficient| * ||W_dec[feature]||``) for ``by="magnitude"``, highest
    score first for ``by="attribution"``. ``explained`` is the cosine between the original
    vector and the reconstruction.
    """

    vector: Float[Tensor, " d_model"]
    features: Int[Tensor, " k"]
    coefficients: Float[Tensor, " k"]
    explained: float


def _log(message: str) -> None:
    print(f"[steerx_lens] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE saved by SAELens (``save_model`` / ``save_inference_model``) from a folder.

    Raises ``FileNotFoundError`` when the folder does not exist and :class:`SAELoadError` when
    its ``cfg.json`` / ``sae_weights.safetensors`` are missing or unreadable. The weights are
    copied into memory, so the SAE stays valid when the folder is later rewritten or deleted.
    """
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no SAE folder at {folder}: expected a folder written by SAELens with "
            f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
        )
    missing = [
        name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (folder / name).is_file()
    ]
    if missing:
        raise SAELoadError(
            f"{folder} is not a complete SAELens SAE folder: missing {', '.join(missing)}"
        )
    try:
        sae = SAE.load_from_disk(folder, device=device)
    except Exception as exc:  # SAELens raises many types on bad json, weights or architecture
        raise SAELoadError(
            f"could not load the SAE in {folder} ({type(exc).__name__}: {exc}); the folder looks "
            "corrupt: re-save it with SAELens, or delete it (train_demo_sae re-trains cached SAEs)"
        ) from exc
    with torch.no_grad():  # CPU weights are memory-mapped: rewriting the file would crash them
        for tensor in [*sae.parameters(), *sae.buffers()]:
            tensor.data = tensor.data.clone()
    return sae


def check_sae_fits(sae: SAE, model: Any, site: str | None = None) -> None:
    """Check that ``sae`` reads the activations of ``model`` at ``site``.

    Raises :class:`VectorShapeError` when the SAE's ``d_in`` differs from the model's
    ``d_model``, :class:`ModelMismatchError` when the SAE was trained at another hook than
    ``site`` or (for SAEs from :func:`train_demo_sae`) on another model, and
    :class:`~steerx_lens.errors.UnknownSiteError` when the model has no such site.
    """
    adapter = get_adapter(model)
    if sae.cfg.d_in != adapter.d_model:
        raise VectorShapeError(
            f"the SAE reads {sae.cfg.d_in}-dimensional activations but the model's d_model is "
            f"{adapter.d_model}: it was trained on another model"
        )
    metadata = getattr(sae.cfg, "metadata", None)
    hook_name = getattr(metadata, "hook_name", None)
    if site is not None:
        adapter.resolve(site)
        if hook_name is not None and hook_name != site:
            raise ModelMismatchError(
                f"the SAE was trained on {hook_name!r}, not on {site!r}: use it at its own site "
                "or train one for this site"
            )
    fingerprint = getattr(metadata, FINGERPRINT_KEY, None)
    if fingerprint is not None and fingerprint != adapter.fingerprint():
        raise ModelMismatchError(
            f"the SAE was trained on model {fingerprint}, this model is {adapter.fingerprint()}"
        )


def _sae_site(sae: SAE, site: str | None) -> str:
    """``site``, or the hook the SAE was trained on."""
    chosen = site or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if chosen is None:
        raise ValueError("the SAE does not record its hook name; pass site=...")
    return chosen


# --------------------------------------------------------------------------------------------
# Training (SAELens runner, offline) and the cache
# --------------------------------------------------------------------------------------------


def default_corpus(n_tweets: int = DEFAULT_CORPUS_TWEETS) -> list[str]:
    """Local training texts: ``n_tweets`` health tweets per account plus the synthetic users.

    The health tweets' held-out items (each account's latest 20) are left out, so they can
    measure reconstruction on unseen text (:func:`heldout_corpus`).
    """
    from steerx_lens.data import load_health_tweets, make_synthetic_users

    texts = [
        item.output
        for user in load_health_tweets(n_history=n_tweets, n_heldout=20)
        for item in user.history
    ]
    synthetic = make_synthetic_users(n_users=6, n_history=40, n_heldout=0, seed=0)
    texts += [f"{item.input} {item.output}" for user in synthetic for item in user.history]
    return texts


def heldout_corpus() -> list[str]:
    """Health tweets that :func:`default_corpus` never trains on (20 per account, 320 texts)."""
    from steerx_lens.data import load_health_tweets

    return [
        item.output
        for user in load_health_tweets(n_history=DEFAULT_CORPUS_TWEETS, n_heldout=20)
        for item in user.heldout
    ]


def _token_rows(
    tokenizer: Any, texts: Sequence[str], context_size: int, seed: int
) -> list[list[int]]:
    """Shuffle the texts, tokenize them (no BOS), join them with EOS, cut rows of context_size."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for ids in tokenizer(order, add_special_tokens=False)["input_ids"]:
        flat.extend(ids)
        flat.append(eos)
    rows = [
        flat[i : i + context_size] for i in range(0, len(flat) - context_size + 1, context_size)
    ]
    if not rows:
        raise ValueError(
            f"the corpus has {len(flat)} tokens, fewer than one row of context_size={context_size}"
        )
    return rows


def _demo_fingerprint() -> str:
    """The demo model's adapter fingerprint, read from its folder without loading the model."""
    from safetensors import safe_open

    folder = demo_model_dir()
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        embedding = weights.get_slice("model.embed_tokens.weight")[:32]
    return f"{config['num_hidden_layers']}x{config['hidden_size']}:{weights_digest(embedding)}"


def _cache_key(**parts: Any) -> str:
    """A readable, filesystem-safe cache folder name with a hash of every training input."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{parts['site']}-d{parts['d_sae']}-n{parts['n_tokens']}-s{parts['seed']}-{digest}"


def train_demo_sae(
    layer: int = DEFAULT_LAYER,
    *,
    site: str | None = None,
    d_sae: int = DEFAULT_D_SAE,
    n_tokens: int = DEFAULT_N_TOKENS,
    context_size: int = DEFAULT_CONTEXT_SIZE,
    l1_coefficient: float = DEFAULT_L1_COEFFICIENT,
    lr: float = DEFAULT_LR,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seed: int = 0,
    model: Any = None,
    corpus: Sequence[str] | None = None,
    force: bool = False,
    cache: str | Path | None = None,
) -> SAE:
    """Train a small standard (ReLU + L1) SAE at ``site`` with SAELens, offline, and cache it.

    ``model`` is a ``HookedTransformer`` (default: the demo model on ``transformer_lens``);
    ``site`` defaults to ``blocks.{layer}.hook_resid_post``; ``corpus`` defaults to
    :func:`default_corpus`. Texts are tokenized locally into rows of ``context_size`` tokens (EOS
    between texts) and fed to ``LanguageModelSAETrainingRunner`` as a ``datasets.Dataset``; the
    first position of each row is not trained on (it is the attention sink: on the demo model
    its residual norm is ~150x the others). Activations are normalised to mean norm sqrt(d_in)
    during training and the scale is folded into the saved weights.

    The result is saved (``save_inference_model``) under ``<cache>/<key>`` (``cache`` defaults
    to ``cache_dir()/"sae"``), where the
    key covers the model fingerprint, site, sizes, seed, hyper-parameters and a hash of the
    corpus; later calls load it (seconds) unless ``force``. The folder is written atomically.
    Default time: see :data:`DEFAULT_N_TOKENS`.
    """
    if d_sae < 1 or context_size < 2 or n_tokens < batch_tokens or batch_tokens < 1:
        raise ValueError(
            "need d_sae >= 1, context_size >= 2 and n_tokens >= batch_tokens >= 1, got "
            f"d_sae={d_sae}, context_size={context_size}, n_tokens={n_tokens}, "
            f"batch_tokens={batch_tokens}"
        )
    site = site or f"blocks.{layer}.hook_resid_post"
    texts = list(corpus) if corpus is not None else default_corpus()
    fingerprint = get_adapter(model).fingerprint() if model is not None else _demo_fingerprint()
    corpus_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = _cache_key(
        format=CACHE_FORMAT,
        model=fingerprint,
        site=site,
        d_sae=d_sae,
        n_tokens=n_tokens,
        seed=seed,
        context_size=context_size,
        l1_coefficient=l1_coefficient,
        lr=lr,
        batch_tokens=batch_tokens,
        corpus=corpus_hash,
    )
    root = Path(cache) if cache is not None else cache_dir() / SAE_CACHE_DIRNAME
    target = root / key
    if target.exists() and not force:
        try:
            return load_sae(target)
        except SAELoadError as exc:
            _log(f"cached SAE unusable, re-training: {exc}")
    if model is None:
        model = load_demo_model("transformer_lens")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".training-", dir=root))
    try:
        _log(f"training an SAE at {site} (d_sae={d_sae}, {n_tokens:,} tokens) with SAELens ...")
        start = time.perf_counter()
        trained = _run_sae_lens(
            model,
            site,
            texts,
            d_sae=d_sae,
            n_tokens=n_tokens,
            context_size=context_size,
            l1_coefficient=l1_coefficient,
            lr=lr,
            batch_tokens=batch_tokens,
            seed=seed,
        )
        metadata = trained.cfg.metadata
        metadata[FINGERPRINT_KEY] = fingerprint
        metadata["steerx_train_seconds"] = round(time.perf_counter() - start, 1)
        metadata["steerx_corpus_sha256"] = corpus_hash
        trained.save_inference_model(staging)
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"trained in {metadata['steerx_train_seconds']} s; cached at {target}")
    return load_sae(target)


def _install(staging: Path, target: Path) -> None:
    """Move a finished folder into place with ``os.replace`` (replacing an older one)."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _run_sae_lens(
    model: Any,
    site: str,
    texts: Sequence[str],
    *,
    d_sae: int,
    n_tokens: int,
    context_size: int,
    l1_coefficient: float,
    lr: float,
    batch_tokens: int,
    seed: int,
) -> TrainingSAE:
    """One ``LanguageModelSAETrainingRunner`` run on local token rows; returns the TrainingSAE."""
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )
    from transformer_lens import HookedTransformer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("SAELens training installs signal handlers: run it in the main thread")
    if not isinstance(model, HookedTransformer):
        raise BackendError(
            "SAE training runs SAELens on a HookedTransformer: load the model with "
            f"backend='transformer_lens' (got {type(model).__name__})"
        )
    adapter = get_adapter(model)
    adapter.resolve(site)
    rows = _token_rows(adapter.tokenizer, texts, context_size, seed)
    steps = max(1, n_tokens // batch_tokens)
    device = str(adapter.device)
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=adapter.d_model,
            d_sae=d_sae,
            l1_coefficient=l1_coefficient,
            l1_warm_up_steps=steps // 10,
            normalize_activations="expected_average_only_in",
            dtype="float32",
            device=device,
        ),
        model_name=str(model.cfg.model_name),
        model_from_pretrained_kwargs={},  # the model is given; SAELens would only print advice
        hook_name=site,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=context_size,
        seqpos_slice=(1, None),
        prepend_bos=False,
        training_tokens=n_tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        n_batches_for_norm_estimate=8,
        lr=lr,
        lr_warm_up_steps=steps // 20,
        seed=seed,
        device=device,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )
    dataset = Dataset.from_dict({"input_ids": rows})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message=".*fewer samples.*")  # rows vs tokens
            warnings.filterwarnings("ignore", message=".*copy construct from a tensor.*")
            torch.manual_seed(seed)
            runner = LanguageModelSAETrainingRunner(
                cfg, override_dataset=dataset, override_model=model
            )
            return runner.run()
    finally:  # the runner installs its own SIGINT/SIGTERM handlers and leaves them in place
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# Vectors in SAE feature space
# --------------------------------------------------------------------------------------------


def _check_vector(vector: Tensor, width: int) -> None:
    if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.shape[0] != width:
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise VectorShapeError(f"expected a [{width}] vector (the SAE's d_in), got {shape}")
    if not torch.isfinite(vector).all():
        raise NonFiniteError("the vector contains NaN or infinity")


def _least_squares(target: Float[Tensor, " d"], atoms: Float[Tensor, "m d"]) -> Float[Tensor, " m"]:
    """Coefficients c minimising ``||target - c @ atoms||`` (float64, CPU)."""
    return torch.linalg.lstsq(atoms.T, target.unsqueeze(1)).solution.squeeze(1)


def _matching_pursuit(
    target: Float[Tensor, " d"], unit_atoms: Float[Tensor, "n d"], k: int
) -> list[int]:
    """Orthogonal matching pursuit: k greedy picks by |residual . atom|, refit after each."""
    chosen: list[int] = []
    residual = target
    tolerance = 1e-9 * float(target.norm())
    for _ in range(k):
        if float(residual.norm()) <= tolerance:
            break  # already exact: more features would only add noise
        scores = (unit_atoms @ residual).abs()
        scores[chosen] = -1.0
        chosen.append(int(scores.argmax()))
        basis = unit_atoms[chosen]
        residual = target - _least_squares(target, basis) @ basis
    return chosen


def project_vector(
    vector: Float[Tensor, " d_model"],
    sae: SAE,
    *,
    k: int = 32,
    by: SelectBy = "magnitude",
    feature_scores: Float[Tensor, " d_sae"] | None = None,
) -> SAEProjection:
    """Rewrite ``vector`` as a combination of at most ``k`` SAE decoder rows and decode it back.

    Feature choice:

    - ``by="magnitude"``: orthogonal matching pursuit over the unit-normalised decoder rows —
      repeatedly add the feature most aligned with what is still unexplained, then refit. A
      one-shot top-k of ``|vector @ W_dec_normalised.T|`` picks redundant, near-duplicate
      features of an overcomplete decoder; pursuit picks the ``k`` that together explain the
      vector, and recovers a vector that truly is a sparse combination of decoder rows. Stops
      early once the vector is reconstructed exactly.
    - ``by="attribution"``: the ``k`` features with the highest ``feature_scores`` (e.g. causal
      attributions of the user's preference tokens), whatever their alignment with the vector.

    Coefficients: least squares, ``argmin_c ||vector - c @ W_dec[features]||`` on the chosen
    features (not the SAE encoder: a steering vector is a difference of activations, and the
    encoder's biases are calibrated for activations themselves, so ``encode(vector)`` is not a
    decomposition of it).
    """
    decoder = sae.W_dec.detach()
    d_sae, d_model = decoder.shape
    _check_vector(vector, d_model)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, d_sae)
    target = vector.detach().to("cpu", torch.float64)
    if float(target.norm()) == 0.0:
        raise ValueError("cannot project a zero vector")
    atoms = decoder.to("cpu", torch.float64)
    norms = atoms.norm(dim=1).clamp_min(1e-12)
    unit_atoms = atoms / norms.unsqueeze(1)
    if by == "magnitude":
        chosen = torch.tensor(_matching_pursuit(target, unit_atoms, k), dtype=torch.long)
    elif by == "attribution":
        if feature_scores is None:
            raise ValueError('by="attribution" needs feature_scores (one score per SAE feature)')
        if feature_scores.shape != (d_sae,):
            raise VectorShapeError(
                f"feature_scores must be [{d_sae}] (one per SAE feature), got "
                f"{tuple(feature_scores.shape)}"
            )
        if not torch.isfinite(feature_scores).all():
            raise NonFiniteError("feature_scores contains NaN or infinity")
        chosen = feature_scores.detach().cpu().topk(k).indices
    else:
        raise ValueError(f'by must be "magnitude" or "attribution", got {by!r}')
    unit_coefficients = _least_squares(target, unit_atoms[chosen])
    if by == "magnitude":
        order = unit_coefficients.abs().argsort(descending=True)
        chosen, unit_coefficients = chosen[order], unit_coefficients[order]
    reconstruction = unit_coefficients @ unit_atoms[chosen]
    explained = float(torch.cosine_similarity(target, reconstruction, dim=0))
    return SAEProjection(
        vector=reconstruction.to(vector.device, vector.dtype),
        features=chosen.to(vector.device),
        coefficients=(unit_coefficients / norms[chosen]).to(vector.device, vector.dtype),
        explained=explained,
    )


def feature_steering_vector(
    sae: SAE, features: Sequence[int], weights: Sequence[float] | None = None
) -> Float[Tensor, " d_model"]:
    """``sum_i weights[i] * W_dec[features[i]] / ||W_dec[features[i]]||`` (weights default 1).

    Unit rows make a weight mean "this many units along the feature's direction", whatever the
    decoder norm; scale the result with ``Steer(alpha=...)``.
    """
    decoder = sae.W_dec.detach()
    ids = [int(f) for f in features]
    if not ids:
        raise ValueError("choose at least one feature")
    bad = [f for f in ids if not 0 <= f < decoder.shape[0]]
    if bad:
        raise ValueError(
            f"features {bad} are out of range: the SAE has {decoder.shape[0]} features"
        )
    coef = (
        torch.ones(len(ids)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    )
    if coef.shape != (len(ids),):
        raise ValueError(f"got {coef.numel()} weights for {len(ids)} features")
    if not torch.isfinite(coef).all():
        raise NonFiniteError("weights contain NaN or infinity")
    rows = decoder[ids].float()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return coef.to(unit.device) @ unit


# --------------------------------------------------------------------------------------------
# Feature activations on text
# --------------------------------------------------------------------------------------------


def _site_activations(
    model: Any, inputs: Inputs, site: str, batch_size: int, skip_first: bool
) -> Iterator[tuple[Float[Tensor, "b pos d_model"], Bool[Tensor, "b pos"]]]:
    """Activations at ``site`` in chunks of a right-padded batch, with the mask of kept tokens.

    Kept = real tokens, minus each row's first token when ``skip_first`` (the attention sink,
    which SAEs from :func:`train_demo_sae` never saw).
    """
    adapter = get_adapter(model)
    batch = adapter.encode(inputs, padding_side="right")
    for start in range(0, batch.input_ids.shape[0], batch_size):
        chunk = Batch(
            batch.input_ids[start : start + batch_size],
            batch.attention_mask[start : start + batch_size],
        )
        store = hooks.activations(model, chunk, [site])
        keep = chunk.attention_mask.bool().clone()
        if skip_first:
            first = keep.int().argmax(dim=1)
            keep[torch.arange(keep.shape[0]), first] = False
        yield store[site], keep


@torch.no_grad()
def feature_activations(
    model: Any,
    sae: SAE,
    texts: Inputs,
    site: str | None = None,
    *,
    skip_first: bool = True,
    batch_size: int = 16,
) -> Float[Tensor, "batch pos d_sae"]:
    """SAE feature activations of ``texts`` at ``site`` (default: the SAE's own hook).

    Texts are tokenized by the model's adapter (no BOS) and right-padded, so position ``t`` is
    the ``t``-th token of each text; token ids / a :class:`~steerx_lens.backends.Batch` work too.
    Padding positions (and the first token, when ``skip_first``) are 0.
    """
    site = _sae_site(sae, site)
    check_sae_fits(sae, model, site)
    pieces = []
    for acts, keep in _site_activations(model, texts, site, batch_size, skip_first):
        encoded = sae.encode(acts.to(sae.device, sae.dtype)).float().cpu()
        pieces.append(encoded * keep.unsqueeze(-1).cpu())
    return torch.cat(pieces)


def top_features(
    activations: Float[Tensor, "batch pos d_sae"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    k: int = 10,
) -> Int[Tensor, " k"]:
    """Feature ids ranked by mean activation over the positions in ``mask`` (default: all).

    Padding is 0 in :func:`feature_activations`, so without a mask the ranking equals the
    ranking over real tokens. Pass e.g. the mask of a user's preference-driven tokens.
    """
    if activations.ndim != 3:
        raise VectorShapeError(
            f"activations must be [batch, pos, d_sae], got {tuple(activations.shape)}"
        )
    if mask is None:
        selected = activations.reshape(-1, activations.shape[-1])
    else:
        if mask.shape != activations.shape[:2]:
            raise VectorShapeError(
                f"mask must be [batch, pos] = {tuple(activations.shape[:2])}, got {tuple(mask.shape)}"
            )
        selected = activations[mask.to(activations.device)]
        if selected.shape[0] == 0:
            raise ValueError("the mask selects no positions")
    return selected.mean(dim=0).topk(min(k, activations.shape[-1])).indices


@torch.no_grad()
def explained_variance(
    model: Any, sae: SAE, texts: Inputs, site: str | None = None, *, batch_size: int = 16
) -> float:
    """Fraction of the activation variance the SAE reconstructs on ``texts``.

    ``1 - sum ||x - sae(x)||^2 / sum ||x - mean(x)||^2`` over real tokens, each row's first
    token (attention sink) excluded.
    """
    site = _sae_site(sae, site)
    check_sae_fits(sae, model, site)
    kept = []
    for acts, keep in _site_activations(model, texts, site, batch_size, skip_first=True):
        kept.append(acts[keep].to(sae.device, sae.dtype))
    x = torch.cat(kept)
    if x.shape[0] < 2:
        raise ValueError(
            "need at least two tokens (after the first of each text) to measure variance"
        )
    residual = (x - sae.decode(sae.encode(x))).pow(2).sum()
    return float(1 - residual / (x - x.mean(dim=0)).pow(2).sum())
