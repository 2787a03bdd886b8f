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
from steerx_lens.evaluation.report import comparison_row


def rows(path: Path) -> list[str]:
    """One Markdown row per goal comparison of the run summarised in ``path``: the report's
    row with the goal family's Holm p, then the Holm p over every comparison."""
    metrics = json.loads(path.read_text(encoding="utf-8"))
    config = metrics["config"]
    run = f"{config.get('data', '?')} / {config['backbone']} ({path.stem})"
    out = []
    for c in confirmatory(metrics["comparisons"]):
        goal_row = comparison_row({**c, "p_holm": c["p_holm_goal"]})
        all_p = "–" if c["p_holm"] is None else f"{c['p_holm']:.3g}"
        out.append(f"| {run} {goal_row} {all_p} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="metrics.json files or summaries")
    args = parser.parse_args()
    print(
        "| run | comparison | metric | mean | 95% CI | Wilcoxon p | Holm p, goal family "
        "| users positive | Holm p, all comparisons |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.runs:
        print("\n".join(rows(path)))


if __name__ == "__main__":
    main()
