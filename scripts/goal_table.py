"""The goal's comparisons (the confirmatory family) of finished ``steerx eval`` runs, as one
Markdown table.

Reads each ``metrics.json`` or ``docs/evidence`` summary, applies
:func:`steerx_lens.evaluation.experiment.confirmatory` (Holm over the six comparisons of
``GOAL_FAMILY`` alone) to its stored Wilcoxon p's, and prints one row per run and comparison
beside the Holm p over every comparison of the run. Runs written before the family existed
get the same numbers as a new run would.

    python scripts/goal_table.py docs/evidence/eval_health_likelihood_description.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerx_lens.evaluation.experiment import confirmatory
from steerx_lens.evaluation.report import ALPHA_LEVEL


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def rows(path: Path) -> list[str]:
    """One Markdown row per goal comparison of the run summarised in ``path``."""
    metrics = json.loads(path.read_text(encoding="utf-8"))
    config = metrics["config"]
    run = f"{config.get('data', '?')} / {config['backbone']} ({path.stem})"
    out = []
    for c in confirmatory(metrics["comparisons"]):
        low, high = c["ci95"]
        passed = c["p_holm_goal"] is not None and c["p_holm_goal"] < ALPHA_LEVEL
        out.append(
            f"| {run} | {c['a']} vs {c['b']} | {c['metric']} | {c['mean']:+.3f} "
            f"[{low:+.3f}, {high:+.3f}] | {c['n_positive']}/{c['n_users']} "
            f"| {_p(c['wilcoxon_p'])} | {_p(c['p_holm_goal'])}{' ✓' if passed else ''} "
            f"| {_p(c['p_holm'])} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="metrics.json files or summaries")
    args = parser.parse_args()
    print(
        "| run | comparison | metric | mean [95% CI] | users positive | Wilcoxon p "
        "| Holm p, goal family | Holm p, all comparisons |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.runs:
        print("\n".join(rows(path)))


if __name__ == "__main__":
    main()
