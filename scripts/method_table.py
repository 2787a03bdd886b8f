"""Every method × metric of a ``steerx eval`` run with a 95% CI: the markdown table of a closing
note or of docs/method.md.

Each cell is the mean over users of the user's value (token-pooled NLL, item-mean ROUGE-L /
BLEU) and the percentile interval of the two-level bootstrap (users, then items within users;
:func:`steerx_lens.evaluation.stats.two_level_bootstrap`), from ``metrics.json``'s per-item
values. The paired comparisons (which method beats which) are in the run's ``report.md``.

    python scripts/method_table.py runs/demo/metrics.json [--metrics nll,nll_distinct,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from steerx_lens.evaluation.stats import UserItems, two_level_bootstrap

DEFAULT_METRICS = "nll,nll_distinct,nll_pref,rougeL,bleu"


def user_items(per_user: list[dict], method: str, metric: str) -> list[UserItems]:
    """Per user with a value, the method's per-item values and weights for ``metric``."""
    users = []
    for record in per_user:
        found = record["items"].get(method, {}).get(metric)
        if found is None:
            continue
        pairs = [
            (v, w)
            for v, w in zip(found["values"], found["weights"], strict=True)
            if v is not None and w > 0
        ]
        if pairs:
            users.append(
                UserItems(np.array([v for v, _ in pairs]), np.array([w for _, w in pairs]))
            )
    return users


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.json")
    parser.add_argument("--metrics", dest="names", default=DEFAULT_METRICS)
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    run = json.loads(args.metrics.read_text(encoding="utf-8"))
    names = [name for name in args.names.split(",") if name]
    seed = int(run["config"].get("seed", 0))
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for method in run["methods"]:
        cells = []
        for name in names:
            users = user_items(run["per_user"], method, name)
            if not users:
                cells.append("–")
                continue
            mean = float(np.mean([user.mean for user in users]))
            low, high = two_level_bootstrap(users, n_boot=args.n_boot, seed=seed)
            digits = 3 if name.startswith("nll") else 1
            cells.append(f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
