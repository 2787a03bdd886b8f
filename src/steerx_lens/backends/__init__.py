"""Backends: one module per stack, found through a small registry.

A backend module (see :mod:`steerx_lens.backends.hf` for the smallest) defines:

- ``STACK``: the top-level package its models come from; detection skips the backend until
  that package is imported, so stacks that are not in use are never imported here;
- ``matches(model) -> bool`` and ``make_adapter(model, tokenizer) -> ModelAdapter``;
- ``load(folder, tokenizer, dtype, device, device_map) -> model`` and ``SUPPORTS_DEVICE_MAP``.

Adding a backend is one such file plus one :func:`register_backend` call. Everything a backend
needs from the rest of the library is in :mod:`steerx_lens.core` and
:mod:`steerx_lens.backends.base`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch

from steerx_lens.backends.base import ModelAdapter
from steerx_lens.errors import BackendError
from steerx_lens.extras import require

Backend = Literal["hf", "transformer_lens", "bridge", "nnsight"]


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives (``module``) and the package its models come from (``stack``)."""

    module: str
    stack: str


BACKENDS: tuple[str, ...] = ("hf", "transformer_lens", "bridge", "nnsight")
"""The built-in backends (``REGISTRY`` also holds the ones added by :func:`register_backend`)."""
REGISTRY: dict[str, BackendEntry] = {
    "hf": BackendEntry("steerx_lens.backends.hf", "transformers"),
    "transformer_lens": BackendEntry("steerx_lens.backends.transformer_lens", "transformer_lens"),
    "bridge": BackendEntry("steerx_lens.backends.bridge", "transformer_lens"),
    "nnsight": BackendEntry("steerx_lens.backends.nnsight", "nnsight"),
}
DETECTION_ORDER: tuple[str, ...] = ("nnsight", "bridge", "transformer_lens", "hf")
"""Wrappers before what they wrap: an nnsight envoy or a bridge holds an HF model."""

_ADAPTERS: weakref.WeakKeyDictionary[Any, ModelAdapter] = weakref.WeakKeyDictionary()


def register_backend(name: str, module: str, stack: str) -> None:
    """Add (or replace) the backend ``name`` implemented by ``module`` (detected first)."""
    global DETECTION_ORDER
    REGISTRY[name] = BackendEntry(module, stack)
    DETECTION_ORDER = (name, *(n for n in DETECTION_ORDER if n != name))


def backend_module(name: str) -> ModuleType:
    """The module of the backend ``name``; ``ValueError`` naming the choices if unknown."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {tuple(REGISTRY)}")
    require(REGISTRY[name].stack, f"the {name} backend")
    return importlib.import_module(REGISTRY[name].module)


def available_backends() -> tuple[str, ...]:
    """The registered backends that can load models here: their stack is installed and, where
    the module says so (``available()``), in a version it supports."""
    names = []
    for name, entry in REGISTRY.items():
        if importlib.util.find_spec(entry.stack) is None:
            continue
        module = importlib.import_module(entry.module)
        if getattr(module, "available", lambda: True)():
            names.append(name)
    return tuple(names)


def _default_tokenizer(model: Any) -> Any:
    """The model's own tokenizer, or the one saved next to its weights."""
    attached = getattr(model, "tokenizer", None)
    if attached is not None:
        return attached
    from transformers import AutoTokenizer

    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", None)
    if not source:
        raise BackendError("the model has no tokenizer attached; pass tokenizer=...")
    return AutoTokenizer.from_pretrained(source)


def get_adapter(model: Any, tokenizer: Any = None, remote: Any = None) -> ModelAdapter:
    """Return the (cached) adapter for ``model``, built by the first backend that matches it.

    ``remote`` (nnsight models only) sets where every later call on ``model`` runs: ``True``
    (NDIF), ``"local"`` (nnsight's offline simulation of the remote path), a host URL, or
    ``False``; ``None`` keeps the current setting. See :mod:`steerx_lens.backends.remote`.
    """
    if isinstance(model, ModelAdapter):
        adapter = model
    else:
        adapter = _ADAPTERS.get(model)
        if adapter is None or (tokenizer is not None and tokenizer is not adapter.tokenizer):
            adapter = _build_adapter(model, tokenizer)
            _ADAPTERS[model] = adapter
    if remote is not None:
        set_remote = getattr(adapter, "set_remote", None)
        if set_remote is not None:
            set_remote(remote)
        elif remote:
            raise BackendError(
                f"remote execution needs an nnsight model, not a {adapter.name} model; load one "
                "with steerx_lens.backends.remote.load_remote_model or "
                "load_model_dir(..., 'nnsight')"
            )
    return adapter


def _build_adapter(model: Any, tokenizer: Any) -> ModelAdapter:
    for name in DETECTION_ORDER:
        entry = REGISTRY[name]
        if entry.stack not in sys.modules:  # no model of an unimported stack can exist
            continue
        module = importlib.import_module(entry.module)
        if module.matches(model):
            return module.make_adapter(model, tokenizer or _default_tokenizer(model))
    raise BackendError(
        f"unsupported model type {type(model).__name__}: steerx_lens supports transformers "
        "causal LMs, HookedTransformer, TransformerBridge and nnsight models"
    )


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a local model folder, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    folder: str | Path,
    backend: str = "hf",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
) -> Any:
    """Load a local HF model folder (weights + tokenizer) on the backend ``backend``.

    Returns a ``transformers`` causal LM (``hf``), a ``HookedTransformer``
    (``transformer_lens``), a ``TransformerBridge`` (``bridge``) or an nnsight
    ``TransformersModel`` (``nnsight``), read from disk only. Its adapter keeps the folder's
    plain tokenizer, so every backend sees the same token ids (TransformerLens's own copy
    prepends BOS). ``device_map`` (e.g. ``"auto"``, needs ``accelerate``) spreads an
    ``hf``/``nnsight`` model over devices instead of ``device``.
    """
    module = backend_module(backend)
    if device_map is not None and not module.SUPPORTS_DEVICE_MAP:
        raise ValueError(f"the {backend} backend does not support device_map; load on one device")
    tokenizer = load_tokenizer(folder)
    model = module.load(Path(folder), tokenizer, dtype, device, device_map)
    get_adapter(model, tokenizer)
    return model


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendEntry",
    "ModelAdapter",
    "REGISTRY",
    "available_backends",
    "backend_module",
    "get_adapter",
    "load_model",
    "load_tokenizer",
    "register_backend",
]
