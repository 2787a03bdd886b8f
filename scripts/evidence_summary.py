"""Write the summary of a ``steerx eval`` run that docs/method.md and the README cite.

Keeps ``metrics.json``'s config, primary comparison, per-method means, every comparison, the
generation check, the goal's comparisons (runs since the confirmatory family) and failures,
plus each user's scores (``per_user_scores``); drops the per-item values, generations and
attribution summaries (they stay in the run folder).

    python scripts/evidence_summary.py runs/demo/metrics.json docs/evidence/eval_health.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerx_lens.atomic import write_text

KEPT = ("config", "primary", "methods", "comparisons", "generation_check", "failures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.json")
    parser.add_argument("out", type=Path, help="where the summary goes")
    args = parser.parse_args()
    metrics = json.loads(args.metrics.read_text(encoding="utf-8"))
    summary = {key: metrics[key] for key in KEPT}
    if "goal" in metrics:
        summary["goal"] = metrics["goal"]
    summary["per_user_scores"] = {user["user_id"]: user["scores"] for user in metrics["per_user"]}
    write_text(args.out, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
