"""How stable are causal token effects in the number K of counterfactual users? (issue 12)

On *validation* items only (each user's last ``n_validation`` history items, the user's fit
items as context; held-out items are never read), the patch-CE token effects are estimated with
K other users' contexts for K in ``--ks``, each with two draws of the K users (seeds 0 and 1).
Per dataset and K it prints:

- ``rho_seeds``: Spearman rank correlation of the effects between the two draws (how much the
  estimate depends on *which* users were drawn);
- ``jaccard_seeds``: overlap of the tokens selected as preference-driven (effect > the SteerX
  swap threshold, 2 nats) between the two draws;
- ``rho_ref``: Spearman correlation with the largest K (seed 0), the closest thing to the
  expectation over counterfactual users;
- ``cost``: counterfactual forward rows relative to K=2.

Run: ``.venv/bin/python scripts/counterfactual_stability.py [--datasets health_tweets,...]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from steerx_lens.attribution import AttributionConfig, token_effects  # noqa: E402
from steerx_lens.data import fit_split, has_validation, load_users  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402

SWAP_THRESHOLD = 2.0


def effects_for(model, users, k: int, seed: int) -> list[torch.Tensor]:
    """Per (user, validation item), the token effects with ``k`` counterfactual users."""
    config = AttributionConfig(k_counterfactual=k, seed=seed, max_context_tokens=512)
    fits = [fit_split(user)[0] for user in users]
    out = []
    for user, fit in zip(users, fits, strict=True):
        validation = fit_split(user)[1]
        for item in token_effects(model, fit, fits, config, targets=validation):
            out.append(item.effects.float())
    return out


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float | None:
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--datasets", default="health_tweets,news_outlets,stackexchange_beer,synthetic"
    )
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--users", type=int, default=None)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    model = load_demo_model()
    print("| dataset | users | K | rho_seeds | jaccard_seeds | rho_ref | cost | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        users = [u for u in load_users(dataset, n_users=args.users) if has_validation(u)]
        runs = {}
        for k in ks:
            start = time.perf_counter()
            runs[k] = [effects_for(model, users, k, seed) for seed in (0, 1)]
            runs[k].append(time.perf_counter() - start)
        reference = torch.cat(runs[max(ks)][0])
        for k in ks:
            first, second = torch.cat(runs[k][0]), torch.cat(runs[k][1])
            rho = spearmanr(first.numpy(), second.numpy()).statistic
            rho_ref = spearmanr(first.numpy(), reference.numpy()).statistic
            overlaps = [
                jaccard(a > SWAP_THRESHOLD, b > SWAP_THRESHOLD)
                for a, b in zip(runs[k][0], runs[k][1], strict=True)
            ]
            values = [v for v in overlaps if v is not None]
            jac = f"{np.mean(values):.2f}" if values else "–"
            print(
                f"| {dataset} | {len(users)} | {k} | {rho:.3f} | {jac} | {rho_ref:.3f} | "
                f"{k / ks[0]:.0f}× | {runs[k][2]:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
