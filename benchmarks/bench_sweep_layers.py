"""A whole layer sweep, as shipped vs without sharing anything between layers and cells
(issue 12).

On the demo model and ``--users`` health-tweet users, ``run_sweep`` over ``--layers`` ×
``--alphas`` (× ``--rs``) runs twice, side by side in one process:

- **shipped**: each validation text's activations at every sweep layer come from one pass
  (:func:`steerx_lens.backbones.shared_reads`), so the fits at later layers run no forward
  pass; scoring shares the blocks below the steering layer between a text's rows;
- **separate**: every layer's fit reads its activations again and every row is scored with a
  full pass (``shared_reads`` replaced by a block that keeps nothing, mid-stack passes off).

The per-user evidence (attribution, ŷ, minimal pairs) is computed once in both (it was before
this change too). Both sweeps' NLL changes are compared cell by cell. Run:
``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep_layers.py [--users 6]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from steerx_lens import sweep  # noqa: E402
from steerx_lens.backends import get_adapter  # noqa: E402
from steerx_lens.data import load_users  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.pipeline import SteerX  # noqa: E402


@contextmanager
def keeps_nothing(*_: Any, **__: Any) -> Iterator[None]:
    yield


def timed_sweep(model: Any, users: list, args: argparse.Namespace) -> tuple[float, float, dict]:
    """Wall time of the sweep, of its fits, and its result."""
    fit_s = 0.0
    original = SteerX.fit_many

    def fit_many(self: SteerX, *a: Any, **k: Any) -> Any:
        nonlocal fit_s
        start = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            fit_s += time.perf_counter() - start

    SteerX.fit_many = fit_many  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = sweep.run_sweep(
                model, users, args.layers, args.alphas, out, rs=args.rs, progress=False
            )
            return time.perf_counter() - start, fit_s, result
    finally:
        SteerX.fit_many = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument(
        "--layers", type=lambda s: [int(x) for x in s.split(",")], default="8,12,16"
    )
    parser.add_argument(
        "--alphas", type=lambda s: [float(x) for x in s.split(",")], default="0,0.5,1"
    )
    parser.add_argument("--rs", type=lambda s: [float(x) for x in s.split(",")], default="0.1")
    args = parser.parse_args()
    model = load_demo_model()
    users = load_users("health_tweets", n_users=args.users)
    shipped_s, shipped_fit, shipped = timed_sweep(model, users, args)

    adapter = get_adapter(model)
    sweep_shared_reads = sweep.shared_reads
    sweep.shared_reads = keeps_nothing  # type: ignore[assignment]
    adapter.can_start_mid_stack = False
    try:
        separate_s, separate_fit, separate = timed_sweep(model, users, args)
    finally:
        sweep.shared_reads = sweep_shared_reads  # type: ignore[assignment]
        adapter.can_start_mid_stack = True

    gap = max(
        float(np.nanmax(np.abs(np.asarray(shipped["nll_change"][m]) - np.asarray(grid))))
        for m, grid in separate["nll_change"].items()
    )

    def cells(result: dict) -> dict:
        return {
            m: (e["layer"], e["alpha"], e.get("r")) for m, e in result["best"]["methods"].items()
        }

    same_best = cells(shipped) == cells(separate)
    print(
        f"users {len(shipped['validation_users'])}, layers {args.layers}, alphas {args.alphas}, rs {args.rs}"
    )
    print(f"separate: {separate_s:.0f} s (fits {separate_fit:.0f} s)")
    print(f"shipped : {shipped_s:.0f} s (fits {shipped_fit:.0f} s)")
    print(
        f"speed-up {separate_s / shipped_s:.2f}x; max |Δ nll_change| {gap:.1e}; same best cells: {same_best}"
    )


if __name__ == "__main__":
    main()
