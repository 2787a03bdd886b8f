"""Training a small demo SAE with SAELens, offline, and caching it.

:func:`train_demo_sae` trains a standard (ReLU + L1) SAE with SAELens's own
``LanguageModelSAETrainingRunner`` on a local token dataset (no hub, no wandb: see
:data:`TRAINING_ENVIRONMENT`) and caches it under a key that covers every training input;
:func:`default_corpus` / :func:`heldout_corpus` are the local texts it trains and is checked on.
The trained SAE is used through :mod:`steerx_lens.backbones.sae` (projection, features).
``SAE.from_pretrained`` is never called: it needs the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steerx_lens.backbones.sae import FINGERPRINT_KEY, SAELoadError, load_sae
from steerx_lens.backends import get_adapter
from steerx_lens.backends.base import weights_digest
from steerx_lens.data import load_health_tweets, make_synthetic_users
from steerx_lens.errors import BackendError
from steerx_lens.extras import require
from steerx_lens.models import cache_dir, demo_model_dir, load_demo_model

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE

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


TRAINING_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
"""Environment variables set (where unset) while SAELens is imported and trains, and restored
afterwards: no hub lookups, no wandb run. The session's environment is left as it was."""


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set each variable of ``values`` that is unset; restore the previous environment after."""
    before = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _log(message: str) -> None:
    """A progress line on stderr (training takes minutes)."""
    print(f"[steerx_lens] {message}", file=sys.stderr, flush=True)


def default_corpus(n_tweets: int = DEFAULT_CORPUS_TWEETS) -> list[str]:
    """Local training texts: ``n_tweets`` health tweets per account plus the synthetic users.

    The health tweets' held-out items (each account's latest 20) are left out, so they can
    measure reconstruction on unseen text (:func:`heldout_corpus`).
    """
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
    require("sae_lens", "training the demo SAE")
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
        with _environment(TRAINING_ENVIRONMENT):
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
