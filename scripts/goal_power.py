"""How many users the goal's paired comparisons would need, from finished ``steerx eval`` runs.

For each run and each comparison of the goal's family (and the generation sanity rule's own,
history in the prompt vs none on ROUGE-L), the per-user differences (``per_user_scores``;
positive = the first method better) are resampled with replacement to ``n`` users and
the Wilcoxon signed-rank test of the evaluation (:func:`steerx_lens.evaluation.stats.wilcoxon_p`)
is applied to each resample. The share of resamples with p < 0.05 is the power at ``n`` users
if the comparison comes last in the Holm order (the most lenient case); p < 0.05/6 is the power
if it comes first among the goal family's six; a resample only counts where its mean favours
the first method. A comparison whose users split evenly has no
power at any ``n``: it is an effect-size problem, not a sample-size one.

    python scripts/goal_power.py docs/evidence/eval_health_likelihood_description.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from steerx_lens.evaluation.experiment import GOAL_FAMILY
from steerx_lens.evaluation.generation import SANITY_COMPARISON
from steerx_lens.evaluation.results import NLL_METRICS
from steerx_lens.evaluation.stats import SIGNIFICANCE, wilcoxon_p


def differences(per_user: dict, a: str, b: str, metric: str) -> np.ndarray:
    """Per-user ``a``-vs-``b`` differences on ``metric``, positive = ``a`` better."""
    sign = 1.0 if metric in NLL_METRICS else -1.0
    out = []
    for scores in per_user.values():
        value_a, value_b = scores.get(a, {}).get(metric), scores.get(b, {}).get(metric)
        if value_a is not None and value_b is not None:
            out.append(sign * (value_b - value_a))
    return np.asarray(out, dtype=float)


def resampled_p(diffs: np.ndarray, n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Wilcoxon p's of ``reps`` resamples of ``n`` users, 1.0 where the test is impossible or the
    resample's mean favours the second method (only a win counts)."""
    out = np.ones(reps)
    for i in range(reps):
        sample = rng.choice(diffs, size=n, replace=True)
        p = wilcoxon_p(sample)
        if p is not None and sample.mean() > 0:
            out[i] = p
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="metrics.json files or summaries")
    parser.add_argument("--sizes", default="16,32,64,128", help="user counts to resample")
    parser.add_argument("--reps", type=int, default=500, help="resamples per size")
    parser.add_argument("--metrics", default=None, help="only these metrics (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    family = [*GOAL_FAMILY, SANITY_COMPARISON]
    if args.metrics:
        family = [row for row in family if row[2] in args.metrics.split(",")]
    head = " | ".join(f"power at {n} users, p<0.05 (p<0.05/6)" for n in sizes)
    print(f"| run | comparison | metric | users | mean | users positive | {head} |")
    print("|---|---|---|---|---|---|" + "---|" * len(sizes))
    for path in args.runs:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        config = metrics["config"]
        run = f"{config.get('data', '?')} / {config['backbone']}"
        per_user = metrics.get("per_user_scores") or {
            user["user_id"]: user["scores"] for user in metrics.get("per_user", [])
        }
        if not per_user:
            print(f"| {run} | – | – | no per-user scores in {path} | | | |")
            continue
        for a, b, metric in family:
            diffs = differences(per_user, a, b, metric)
            if diffs.size == 0:
                continue
            ps = [resampled_p(diffs, n, args.reps, rng) for n in sizes]
            cells = " | ".join(
                f"{(p < SIGNIFICANCE).mean():.2f} ({(p < SIGNIFICANCE / len(GOAL_FAMILY)).mean():.2f})"
                for p in ps
            )
            positive = f"{int((diffs > 0).sum())}/{diffs.size}"
            print(
                f"| {run} | {a} vs {b} | {metric} | {diffs.size} | {diffs.mean():+.3g} "
                f"| {positive} | {cells} |"
            )


if __name__ == "__main__":
    main()
