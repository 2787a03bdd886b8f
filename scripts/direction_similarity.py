"""How personal is each personal direction? Cosines between users' directions (issue 13).

For every dataset, on the users' fit items only (validation and held-out items are never
read), it builds each construction's raw personal component per user and reports:

- ``between_users``: the mean cosine between two *different* users' components (1: every user
  gets the same direction; 0: unrelated directions);
- ``own_vs_other_description`` (description-driven constructions): the mean cosine between the
  component built from the user's own description and from the next user's description, on
  the same texts (1: the description's content does not change the direction);
- ``cos_to_others``: the mean signed cosine between a user's component and the mean of the
  other users' unit components (near 1: what every user shares dominates; negative: the
  component points away from the others, as a leave-one-out difference does).

The all-history baseline's personal part (the user's baseline minus the leave-one-out shared
vector) is scored the same way, as ``baseline_personal``; the baseline itself as ``baseline``.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python scripts/direction_similarity.py [--datasets ...]``
(reuses ``scripts/choose_defaults.py``'s evidence cache; writes ``--out`` JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from choose_defaults import gather_evidence  # noqa: E402
from torch import Tensor  # noqa: E402

from steerx_lens.atomic import write_text  # noqa: E402
from steerx_lens.constructions import DESCRIPTION_DRIVEN, with_description  # noqa: E402
from steerx_lens.data import load_users  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.pipeline import SteerX, SteerXConfig  # noqa: E402
from steerx_lens.sweep import split_users  # noqa: E402

CONSTRUCTIONS = ("description_contrast", "description_content", "minimal_pairs", "history_contrast")


def unit(vector: Tensor) -> Tensor:
    return vector / vector.norm()


def similarity(components: dict[str, Tensor | None]) -> dict[str, float | int]:
    """Mean cosine between different users' components and to the mean of the others."""
    present = {u: unit(v) for u, v in components.items() if v is not None and v.norm() > 0}
    ids = sorted(present)
    if len(ids) < 3:
        return {"n_users": len(ids)}
    cosines = [float(present[a] @ present[b]) for i, a in enumerate(ids) for b in ids[i + 1 :]]
    to_others = []
    for u in ids:
        others = torch.stack([present[v] for v in ids if v != u]).mean(0)
        to_others.append(float(present[u] @ unit(others)))
    return {
        "n_users": len(ids),
        "between_users": float(np.mean(cosines)),
        "cos_to_others": float(np.mean(to_others)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="health_tweets,news_outlets,synthetic")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--cache", default="/tmp/steerx_choose_defaults")
    parser.add_argument("--out", default="docs/evidence/direction_similarity.json")
    args = parser.parse_args()
    model = load_demo_model()
    results = {}
    for dataset in args.datasets.split(","):
        start = time.perf_counter()
        train, _ = split_users(load_users(dataset, n_users=args.users), 2)
        cache = Path(args.cache) / dataset
        cache.mkdir(parents=True, exist_ok=True)
        base = SteerXConfig(layer=args.layer)
        pipeline = SteerX(model, base, cache_dir=cache, progress=False)
        gathered = gather_evidence(pipeline, train, cache, "structured")
        fit = pipeline.fit_many(train, evidence=gathered)
        population, site = fit.population, fit.population.site
        users = sorted(fit.users)
        next_user = {u: users[(i + 1) % len(users)] for i, u in enumerate(users)}
        rows: dict[str, dict[str, float | int]] = {
            "baseline": similarity({u: fit.users[u].baseline.vector for u in users}),
            "baseline_personal": similarity(
                {u: fit.users[u].baseline.vector - population.shared_for(u).vector for u in users}
            ),
        }
        for name in CONSTRUCTIONS:
            config = SteerXConfig(layer=args.layer, construction=name)
            variant = SteerX(model, config, cache_dir=cache, progress=False)
            own = {u: variant.personal_component(fit.evidence[u], population, site) for u in users}
            rows[name] = similarity(own)
            if name in DESCRIPTION_DRIVEN:
                pairs = []
                for u in users:
                    other_text = fit.evidence[next_user[u]].description
                    swapped = with_description(fit.evidence[u], other_text)
                    other = variant.personal_component(swapped, population, site)
                    if own[u] is not None and other is not None:
                        pairs.append(float(unit(own[u]) @ unit(other)))
                rows[name]["own_vs_other_description"] = float(np.mean(pairs))
        results[dataset] = rows
        print(f"\n## {dataset} ({len(users)} users, {time.perf_counter() - start:.0f} s)")
        print("| direction | between users | cos to the others' mean | own vs other description |")
        print("|---|---|---|---|")
        for name, row in rows.items():
            cells = [row.get(k) for k in ("between_users", "cos_to_others")]
            swap = row.get("own_vs_other_description")
            text = [f"{c:.3f}" if isinstance(c, float) else "–" for c in [*cells, swap]]
            print(f"| {name} | " + " | ".join(text) + " |", flush=True)
        write_text(args.out, json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
