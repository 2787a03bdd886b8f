"""Choose SteerX's defaults on *validation* items across datasets (issue 13).

For each dataset, users keep their fixed item roles (:mod:`steerx_lens.data.splits`): vectors
are fitted on fit items, every candidate is scored on the validation items, held-out items are
never read. At one layer and ``alpha = 1``, for every anchor (the leave-one-out shared vector, or the
user's own all-history baseline), personal-direction construction
(:data:`steerx_lens.constructions.CONSTRUCTIONS`), strength rule (``fixed`` / ``reliability``)
and ``r`` (the candidate vector is ``anchor + r·‖h‖·w·v̂``), it prints the mean over users of the validation NLL change against no steering
(all tokens and distinctive tokens) and against the user's all-history baseline at the same
cell, with how many users got worse than no steering. The evidence (attribution, ŷ, minimal
pairs) is computed once per dataset and shared by every candidate; all candidates' rows are
scored in one batched call.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python scripts/choose_defaults.py [--datasets ...]``
(writes ``--out`` JSON too).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from steerx_lens.data import load_users  # noqa: E402
from steerx_lens.evaluation.distinct import heldout_distinct_spans  # noqa: E402
from steerx_lens.evaluation.masks import span_masks  # noqa: E402
from steerx_lens.evaluation.metrics import encode_for_eval, token_nll  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.pipeline import SteerX, SteerXConfig, _unit  # noqa: E402
from steerx_lens.sweep import split_users  # noqa: E402

CONSTRUCTIONS = ("minimal_pairs", "description_contrast", "history_contrast", "history_description")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--datasets", default="health_tweets,news_outlets,stackexchange_beer,synthetic"
    )
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--rs", default="0.05,0.1,0.2")
    parser.add_argument("--backbone", default="mean_diff")
    parser.add_argument("--out", default="docs/evidence/choose_defaults.json")
    args = parser.parse_args()
    rs = [float(r) for r in args.rs.split(",")]
    model = load_demo_model()
    constructions = CONSTRUCTIONS if args.backbone != "bipo" else ("minimal_pairs",)
    results = {}
    for dataset in args.datasets.split(","):
        start = time.perf_counter()
        train, validation = split_users(load_users(dataset, n_users=args.users), 2)
        base = SteerXConfig(layer=args.layer, backbone=args.backbone)
        pipeline = SteerX(model, base, progress=False)
        fit = pipeline.fit_many(train)
        population, tokenizer = fit.population, pipeline.adapter.tokenizer
        site, norm = population.site, population.residual_norm
        users = [u for u in sorted(validation) if u in fit.users]
        texts = {u: [encode_for_eval(tokenizer, i) for i in validation[u]] for u in users}
        as_heldout = [replace(u, heldout=validation[u.user_id]) for u in train]
        spans = heldout_distinct_spans(as_heldout)
        by_id = {u.user_id: u for u in as_heldout}
        masks = {u: span_masks(tokenizer, texts[u], by_id[u], spans[u]) for u in users}
        rows: list[tuple[str, str, object]] = []  # (candidate, user, vector)
        for uid in users:
            rows.append(("none", uid, None))
            rows.append(("baseline", uid, fit.users[uid].baseline))
            rows.append(("shared", uid, population.shared_for(uid)))
        for construction in constructions:
            variant = SteerX(model, replace(base, construction=construction), progress=False)
            for uid in users:
                evidence = fit.evidence[uid]
                component = variant.personal_component(evidence, population, site)
                weight = (
                    variant.reliability(evidence, population, site)
                    if component is not None
                    else 0.0
                )
                anchors = {
                    "shared": population.shared_for(uid).vector,
                    "baseline": fit.users[uid].baseline.vector,
                }
                for anchor, start_vector in anchors.items():
                    for strength in ("fixed", "reliability"):
                        scale = 1.0 if strength == "fixed" else weight
                        for r in rs:
                            vector = start_vector
                            if component is not None and scale > 0:
                                vector = start_vector + r * norm * scale * _unit(component)
                            steer = replace(fit.users[uid].steerx, vector=vector, alpha=1.0)
                            name = f"{anchor}+{construction}/{strength}/r={r:g}"
                            rows.append((name, uid, steer))
        flat = [t for _, uid, _ in rows for t in texts[uid]]
        vectors = [v for _, uid, v in rows for _ in texts[uid]]
        nlls = iter(token_nll(model, flat, vectors, batch_size=32))
        scores: dict[str, dict[str, dict[str, float | None]]] = {}
        for name, uid, _ in rows:
            values = [next(nlls) for _ in texts[uid]]
            total = sum(float(v.sum()) for v in values) / sum(v.numel() for v in values)
            chosen = [v[m[: v.numel()]] for v, m in zip(values, masks[uid], strict=True)]
            count = sum(c.numel() for c in chosen)
            distinct = sum(float(c.sum()) for c in chosen) / count if count else None
            scores.setdefault(name, {})[uid] = {"nll": total, "nll_distinct": distinct}
        summary = {}
        for name, per_user in scores.items():
            change = [per_user[u]["nll"] - scores["none"][u]["nll"] for u in users]
            vs_base = [per_user[u]["nll"] - scores["baseline"][u]["nll"] for u in users]
            d = [
                per_user[u]["nll_distinct"] - scores["none"][u]["nll_distinct"]
                for u in users
                if per_user[u]["nll_distinct"] is not None
            ]
            summary[name] = {
                "nll_change": float(np.mean(change)),
                "vs_baseline": float(np.mean(vs_base)),
                "distinct_change": float(np.mean(d)) if d else None,
                "users_worse_than_none": int(sum(c > 0 for c in change)),
                "n_users": len(users),
            }
        results[dataset] = summary
        print(f"\n## {dataset} ({len(users)} users, {time.perf_counter() - start:.0f} s)")
        print(
            "| candidate | Δnll vs none | Δnll vs baseline | Δnll_distinct vs none | worse than none |"
        )
        print("|---|---|---|---|---|")
        for name, s in summary.items():
            dist = "–" if s["distinct_change"] is None else f"{s['distinct_change']:+.4f}"
            print(
                f"| {name} | {s['nll_change']:+.4f} | {s['vs_baseline']:+.4f} | {dist} | "
                f"{s['users_worse_than_none']}/{s['n_users']} |",
                flush=True,
            )
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
