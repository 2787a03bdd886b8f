"""Own description vs another user's, per user, from ``scripts/choose_defaults.py`` output.

For every description-driven candidate ``baseline+<construction>/reliability/r=<r>`` and its
``…[other description]`` twin (the same construction and strength built from the next user's
description), prints how many users the own description serves better on validation NLL (all
tokens and distinctive tokens), the mean difference (positive = own better) and the Wilcoxon
signed-rank p. Run: ``.venv/bin/python scripts/own_vs_other.py docs/evidence/choose_defaults_round7.json
docs/evidence/choose_defaults_round8.json``.
"""

from __future__ import annotations

import json
import sys

from scipy.stats import wilcoxon

CONSTRUCTIONS = (
    "description_contrast",
    "description_distill",
    "description_distill_specific",
    "preference_description",
    "likelihood_description",
)


def paired(differences: list[float]) -> str:
    """``wins/n mean p`` for per-user differences (positive = own description better)."""
    if not differences:
        return "–"
    p = wilcoxon(differences).pvalue if any(differences) else 1.0
    mean = sum(differences) / len(differences)
    wins = sum(d > 0 for d in differences)
    return f"{wins}/{len(differences)} mean {mean:+.4f} p {p:.3f}"


def main(paths: list[str]) -> None:
    per_user: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for dataset, result in json.load(handle)["results"].items():
                per_user.setdefault(dataset, {}).update(result["per_user"])
    for dataset, scores in per_user.items():
        for construction in CONSTRUCTIONS:
            for r in ("0.05", "0.1", "0.2"):
                own = f"baseline+{construction}/reliability/r={r}"
                other = f"baseline+{construction}[other description]/reliability/r={r}"
                if own not in scores or other not in scores:
                    continue
                users = sorted(scores[own])
                nll = [scores[other][u]["nll"] - scores[own][u]["nll"] for u in users]
                distinct = [
                    scores[other][u]["nll_distinct"] - scores[own][u]["nll_distinct"]
                    for u in users
                    if scores[own][u]["nll_distinct"] is not None
                ]
                print(
                    f"{dataset:14s} {construction:28s} r={r:4s} own better: all tokens "
                    f"{paired(nll)} | distinctive tokens {paired(distinct)}"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
