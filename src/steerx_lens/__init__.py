"""steerx_lens: SteerX (disentangled steering for LLM personalization) as a plugin for
TransformerLens, nnsight and plain transformers models.

The user-facing API is importable from the package itself::

    from steerx_lens import Steer, SteerX, load_demo_model, load_users, run

Importing ``steerx_lens`` is cheap and changes nothing in the session: every name of
``__all__`` is imported from the module that defines it on first access (PEP 562), so torch,
the model stacks and matplotlib load only when a name that needs them is used. ``_EXPORTS`` is
the one place that says where each name lives.
"""

from __future__ import annotations

from typing import Any

_EXPORTS: dict[str, str] = {
    # hook entry points (the facade) and the interventions they apply
    "activations": "steerx_lens.hooks",
    "apply": "steerx_lens.hooks",
    "cache": "steerx_lens.hooks",
    "generate": "steerx_lens.hooks",
    "intervene": "steerx_lens.hooks",
    "run": "steerx_lens.hooks",
    "score_tokens": "steerx_lens.hooks",
    "Ablate": "steerx_lens.core",
    "Capture": "steerx_lens.core",
    "HookContext": "steerx_lens.core",
    "Intervention": "steerx_lens.core",
    "Patch": "steerx_lens.core",
    "Steer": "steerx_lens.core",
    # vectors, the method, its evaluation
    "SteeringVector": "steerx_lens.vectors",
    "Population": "steerx_lens.pipeline",
    "SteerX": "steerx_lens.pipeline",
    "SteerXConfig": "steerx_lens.pipeline",
    "Experiment": "steerx_lens.evaluation.experiment",
    # models and data
    "load_demo_model": "steerx_lens.models",
    "load_model_dir": "steerx_lens.models",
    "load_tiny_model": "steerx_lens.models",
    "HistoryItem": "steerx_lens.data",
    "UserHistory": "steerx_lens.data",
    "load_users": "steerx_lens.data",
    "make_synthetic_users": "steerx_lens.data",
    "read_users": "steerx_lens.data",
    "save_users": "steerx_lens.data",
    # attribution and descriptions (the function ``describe`` is not exported: its name is
    # the submodule ``steerx_lens.describe``, which an import of that module rebinds)
    "attribute_user": "steerx_lens.attribution",
    "LLMDescriber": "steerx_lens.describe",
    "TemplateDescriber": "steerx_lens.describe",
    "StructuredDescriber": "steerx_lens.describe",
    "description_quality": "steerx_lens.describe",
    # errors
    "BackendError": "steerx_lens.errors",
    "BatchMismatchError": "steerx_lens.errors",
    "ContextLengthError": "steerx_lens.errors",
    "ModelMismatchError": "steerx_lens.errors",
    "NonFiniteError": "steerx_lens.errors",
    "PositionError": "steerx_lens.errors",
    "SteerXError": "steerx_lens.errors",
    "UnknownSiteError": "steerx_lens.errors",
    "VectorShapeError": "steerx_lens.errors",
    "VectorFileError": "steerx_lens.vectors",
    "SAELoadError": "steerx_lens.backbones.sae",
    "RemoteConfigError": "steerx_lens.backends.remote",
    "RemoteExecutionError": "steerx_lens.backends.remote",
    "RemoteModelError": "steerx_lens.backends.remote",
}

__all__ = sorted(_EXPORTS)


def _version() -> str:
    """The installed distribution's version, else the one in the source tree's pyproject."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steerx-lens")
    except PackageNotFoundError:  # running from a source tree without installation
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])


__version__ = _version()


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access (and keep it)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The exported names (``__all__``) and ``__version__``."""
    return [*__all__, "__version__"]
