"""Compare two run folders (``steerx eval`` / ``steerx fit`` outputs) number by number.

Used to show that a refactor changed no number: every ``*.json`` file and every vector file
(``*.safetensors``) present in the reference folder must exist in the other one, with the same
keys, equal strings and numbers within ``--atol`` (tensors too). Keys that record when or how
long something ran are skipped. Prints one line per difference and a summary; exits 1 on any.

    python scripts/compare_runs.py REFERENCE_DIR NEW_DIR [--atol 1e-6]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open

# ``config_key`` is a hash of the inputs (configuration, model, users' data), not a number;
# the configuration itself is compared in ``metrics.json``.
IGNORED_KEYS = frozenset(
    {"created", "wall_s", "elapsed_s", "seconds", "library_version", "config_key"}
)


def compare(a: Any, b: Any, where: str, atol: float, out: list[str]) -> int:
    """Append a line to ``out`` for each difference between ``a`` and ``b``; count leaves."""
    if isinstance(a, dict) and isinstance(b, dict):
        count = 0
        for key in sorted((set(a) | set(b)) - IGNORED_KEYS, key=str):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'new' if key in b else 'reference'}")
                continue
            count += compare(a[key], b[key], f"{where}.{key}", atol, out)
        return count
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} vs {len(b)}")
            return 1
        return sum(
            compare(x, y, f"{where}[{i}]", atol, out)
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        )
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        if not both_nan and abs(a - b) > atol:
            out.append(f"{where}: {a!r} vs {b!r} (|diff| {abs(a - b):.3g})")
        return 1
    if a != b:
        out.append(f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}")
    return 1


def compare_vector_files(ref: Path, new: Path, atol: float, out: list[str]) -> int:
    """Tensors (max |diff|) and the JSON metadata of two vector files."""
    with safe_open(str(ref), "pt") as f, safe_open(str(new), "pt") as g:
        if set(f.keys()) != set(g.keys()):
            out.append(f"{ref.name}: tensors {sorted(f.keys())} vs {sorted(g.keys())}")
            return 1
        for key in f.keys():
            x, y = f.get_tensor(key), g.get_tensor(key)
            if x.shape != y.shape:
                out.append(f"{ref.name}:{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            elif float((x - y).abs().max()) > atol:
                out.append(f"{ref.name}:{key}: max |diff| {float((x - y).abs().max()):.3g}")
        meta_a = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        meta_b = {k: json.loads(v) for k, v in (g.metadata() or {}).items()}
    return x.numel() + compare(meta_a, meta_b, f"{ref.name}:metadata", atol, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args()
    out: list[str] = []
    files = sorted(
        p
        for p in args.reference.rglob("*")
        if p.suffix in (".json", ".safetensors")
        and "cache" not in p.relative_to(args.reference).parts
    )
    values = 0
    for ref in files:
        rel = ref.relative_to(args.reference)
        new = args.new / rel
        if not new.exists():
            out.append(f"{rel}: missing in {args.new}")
            continue
        if ref.suffix == ".json":
            values += compare(
                json.loads(ref.read_text()), json.loads(new.read_text()), str(rel), args.atol, out
            )
        else:
            values += compare_vector_files(ref, new, args.atol, out)
    for line in out:
        print(line)
    print(
        f"compared {len(files)} files ({values} values) with atol {args.atol}: {len(out)} differences"
    )
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
