"""Optional dependencies: which extra of ``steerx-lens`` brings each one.

The core (hooks, backends for transformers and TransformerLens, attribution, vectors, the
pipeline and evaluation) installs with ``pip install steerx-lens``; the features below need an
extra, and :func:`require` names it when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from steerx_lens.errors import SteerXError

EXTRAS: dict[str, str] = {
    "nnsight": "nnsight",
    "sae_lens": "sae",
    "matplotlib": "plots",
    "circuitsvis": "plots",
    "sklearn": "interop",
}
"""Top-level module -> the extra that installs it (``pip install "steerx-lens[EXTRA]"``)."""


class MissingExtraError(SteerXError, ImportError):
    """A feature needs an optional dependency that is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is None or error.name.split(".")[0] != top:
            raise  # the module exists but one of its own imports is missing
        extra = EXTRAS.get(top)
        hint = f'pip install "steerx-lens[{extra}]"' if extra else f"pip install {top}"
        raise MissingExtraError(
            f"{feature} needs {top!r}, which is not installed: {hint}"
        ) from error
