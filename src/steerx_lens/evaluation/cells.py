"""Each steered method's own cell (layer, alpha, r): symmetric tuning.

``steerx sweep`` picks every method's best cell on validation items and writes them to
``best.json`` as ``{"methods": {method: {"layer", "alpha", "r"?, "validation_nll_change"}}}``;
``steerx eval --best`` applies each method's own cell, so no method is judged at a cell chosen
for another one. Every method's vector is the one added at ``alpha = 1``; ``alpha`` scales the
whole of it. ``r`` (the personal part's norm as a fraction of the median residual norm) applies
to the methods built from SteerX's decomposition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEERED_METHODS = (
    "shared",
    "baseline",
    "steerx",
    "decomposed_baseline",
    "random_swap",
    "description_swap",
)
"""The methods that add a vector (each has its own cell)."""
R_METHODS = ("steerx", "decomposed_baseline", "random_swap", "description_swap")
"""The methods with a personal part of norm ``r·‖h‖``."""
DEFAULT_ALPHA_CANDIDATES = (0.0, 0.5, 1.0)
"""The strengths ``steerx eval`` chooses among for each method on validation items: ``0`` (no
steering) is a candidate, so a method whose validation items say it hurts is not applied."""


@dataclass(frozen=True)
class Cell:
    """Where and how strongly one method steers."""

    layer: int
    alpha: float = 1.0
    r: float | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"layer", "alpha"}`` plus ``"r"`` when the method has one."""
        data: dict[str, Any] = {"layer": self.layer, "alpha": self.alpha}
        if self.r is not None:
            data["r"] = self.r
        return data


def default_cells(layer: int, alpha: float, r: float) -> dict[str, Cell]:
    """Every steered method at the same ``layer`` and ``alpha`` (``r`` where it applies)."""
    return {m: Cell(layer, alpha, r if m in R_METHODS else None) for m in STEERED_METHODS}


def _number(where: str, key: str, value: Any, minimum: float | None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} must be a finite number, got {value!r:.40}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {key!r} must be >= {minimum:g}, got {value!r}")
    return float(value)


def parse_cells(data: Any, defaults: Mapping[str, Cell]) -> dict[str, Cell]:
    """The cells of a parsed ``best.json`` over ``defaults`` (methods it does not name keep
    theirs); raises ``ValueError`` with a one-line reason for anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        raise ValueError('expected {"methods": {method: {"layer", "alpha", "r"?}}}')
    cells = dict(defaults)
    for method, entry in data["methods"].items():
        if method not in STEERED_METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(STEERED_METHODS)}")
        if not isinstance(entry, dict) or "layer" not in entry or "alpha" not in entry:
            raise ValueError(f"{method}: expected an object with 'layer' and 'alpha'")
        layer = _number(method, "layer", entry["layer"], 0)
        if layer != int(layer):
            raise ValueError(f"{method}: 'layer' must be an integer, got {entry['layer']!r}")
        r = entry.get("r")
        cells[method] = Cell(
            int(layer),
            _number(method, "alpha", entry["alpha"], None),
            None if r is None else _number(method, "r", r, 0),
        )
    return cells


def read_cells(path: str | Path, defaults: Mapping[str, Cell]) -> dict[str, Cell]:
    """:func:`parse_cells` of the JSON file at ``path``."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"not a readable JSON file ({error})") from None
    return parse_cells(data, defaults)


def check_alpha_candidates(alphas: Sequence[float]) -> tuple[float, ...]:
    """``alphas`` sorted and deduplicated; ``ValueError`` unless they are finite, >= 0 and at
    least one."""
    values = tuple(sorted({_number("alpha candidates", "alpha", a, 0) for a in alphas}))
    if not values:
        raise ValueError("alpha candidates: give at least one strength")
    return values


def choose_alpha(changes: Mapping[float, float]) -> float:
    """The strength with the lowest mean validation NLL change (``NLL(method) − NLL(none)``,
    ``0`` at ``alpha = 0``); ties go to the weaker strength, so steering must *lower* the
    validation NLL to be chosen over none."""
    finite = {alpha: change for alpha, change in changes.items() if math.isfinite(change)}
    if not finite:
        raise ValueError("no finite validation NLL change to choose a strength from")
    return min(finite, key=lambda alpha: (finite[alpha], abs(alpha)))
