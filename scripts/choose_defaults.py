"""Choose SteerX's defaults on *validation* items across datasets (issue 13).

For each dataset, users keep their fixed item roles (:mod:`steerx_lens.data.splits`): vectors
are fitted on fit items, every candidate is scored on the validation items, held-out items are
never read. At one layer and ``alpha = 1``, for every anchor (the leave-one-out shared vector,
the user's own all-history baseline, or the *shrunk* baseline: shared + w·(baseline − shared),
w the split-half reliability of the baseline's personal part), personal-direction construction
(:data:`steerx_lens.constructions.CONSTRUCTIONS`, raw or *centred*: minus the mean of the other
users' components, so what every user shares leaves the personal part), strength rule
(``fixed`` / ``reliability``) and ``r`` (the candidate is ``anchor + r·‖h‖·w·v̂``), it prints
the mean over users of the validation NLL change against no steering (all tokens and
distinctive tokens) and against the user's all-history baseline, with how many users got worse
than no steering and than the shared vector.

Controls scored on the same items: ``none``, ``shared``, ``baseline``, the description in the
prompt (``description_prompt``) and *another* user's description in the prompt
(``description_prompt_other``), and each description-driven construction built from another
user's description (``…[other description]``). The describer's :func:`description_quality`
is printed per dataset. Evidence (attribution, ŷ, minimal pairs) is computed once per dataset
(cached under ``--cache``) and shared by every candidate; all rows are scored in one batched
call.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python scripts/choose_defaults.py [--datasets ...]``
(writes ``--out`` JSON too).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from steerx_lens.constructions import (  # noqa: E402
    ANY_BACKBONE,
    CONSTRUCTIONS,
    DESCRIPTION_DRIVEN,
    DESCRIPTION_SYSTEM_TEMPLATE,
    with_description,
)
from steerx_lens.data import load_users  # noqa: E402
from steerx_lens.describe import description_quality, make_describer  # noqa: E402
from steerx_lens.evaluation.distinct import heldout_distinct_spans  # noqa: E402
from steerx_lens.evaluation.masks import span_masks  # noqa: E402
from steerx_lens.evaluation.metrics import encode_for_eval, pooled_nll, token_nll  # noqa: E402
from steerx_lens.evidence import UserEvidence  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.pipeline import (  # noqa: E402
    SteerX,
    SteerXConfig,
    _halves,
    _unit,
    split_half_reliability,
)
from steerx_lens.runs import user_file_names  # noqa: E402
from steerx_lens.sweep import split_users  # noqa: E402
from steerx_lens.text import encode_item  # noqa: E402


def gather_evidence(
    pipeline: SteerX, train: list, cache: Path | None, describer: str
) -> dict[str, UserEvidence]:
    """Every user's evidence, from ``cache`` when there (re-described with ``describer``)."""
    population = pipeline.build_population(train)
    write = make_describer(describer, pipeline.model)
    gathered = {}
    names = user_file_names([user.user_id for user in population.users])
    for user in population.users:
        path = None if cache is None else cache / f"{names[user.user_id]}.evidence.safetensors"
        evidence = None
        if path is not None and path.exists():
            evidence = UserEvidence.load(path)
            if evidence.user.history != user.history:  # another split or data: stale
                evidence = None
        if evidence is None:
            evidence = pipeline.evidence(user, population)
            if path is not None:
                evidence.save(path)
        evidence.attribution.description = write(evidence.attribution)
        gathered[user.user_id] = evidence
    return gathered


def worse_beyond_noise(mine: torch.Tensor, shared: torch.Tensor) -> bool:
    """A user's validation tokens are worse under a candidate (``mine``, per-token NLL) than
    under the shared vector by more than 2 standard errors of the per-token difference
    (tokens of a text are correlated, so this calls more users worse than a per-text test
    would); False for texts that differ (prompted controls)."""
    if mine.shape != shared.shape or mine.numel() < 2:
        return False
    diff = mine - shared
    return float(diff.mean()) > 2 * float(diff.std()) / diff.numel() ** 0.5


def prompted(tokenizer: object, items: list, description: str) -> list:
    """``items`` encoded with ``description`` as the system text (the description_prompt)."""
    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
    return [encode_item(tokenizer, i, (), system) for i in items]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--datasets", default="health_tweets,news_outlets,stackexchange_beer,synthetic"
    )
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-history", type=int, default=None)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--rs", default="0.05,0.1,0.2,0.4")
    parser.add_argument("--backbone", default="mean_diff")
    parser.add_argument("--describer", default="structured")
    parser.add_argument("--constructions", default=",".join(CONSTRUCTIONS))
    parser.add_argument("--anchors", default="shared,baseline,shrunk")
    parser.add_argument("--strengths", default="fixed,reliability")
    parser.add_argument("--cache", default="/tmp/steerx_choose_defaults")
    parser.add_argument("--out", default="docs/evidence/choose_defaults.json")
    args = parser.parse_args()
    rs = [float(r) for r in args.rs.split(",")]
    strengths = args.strengths.split(",")
    model = load_demo_model()
    constructions = [c for c in args.constructions.split(",") if c in CONSTRUCTIONS]
    if args.backbone not in ("mean_diff", "sae"):
        constructions = [c for c in constructions if c in ANY_BACKBONE]
    results = {}
    for dataset in args.datasets.split(","):
        start = time.perf_counter()
        users_all = load_users(dataset, n_users=args.users)
        if args.max_history:
            users_all = [replace(u, history=u.history[-args.max_history :]) for u in users_all]
        train, validation = split_users(users_all, 2)
        # the fit's own SteerX vector uses the first listed construction, so a BiPO run never
        # trains one it does not score (its personal parts are scored per construction below)
        base = SteerXConfig(
            layer=args.layer,
            backbone=args.backbone,
            describer=args.describer,
            construction=constructions[0],
        )
        cache = Path(args.cache) / dataset if args.cache else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        pipeline = SteerX(model, base, cache_dir=cache, progress=False)
        gathered = gather_evidence(pipeline, train, cache, args.describer)
        fit = pipeline.fit_many(train, evidence=gathered)
        population, tokenizer = fit.population, pipeline.adapter.tokenizer
        site, norm = population.site, population.residual_norm
        users = [u for u in sorted(validation) if u in fit.users]
        other_of = {u: users[(i + 1) % len(users)] for i, u in enumerate(users)}
        descriptions = {u: fit.evidence[u].description or "" for u in users}
        quality = description_quality(descriptions, {u: fit.evidence[u].attribution for u in users})
        texts = {u: [encode_for_eval(tokenizer, i) for i in validation[u]] for u in users}
        as_heldout = [replace(u, heldout=validation[u.user_id]) for u in train]
        spans = heldout_distinct_spans(as_heldout)
        by_id = {u.user_id: u for u in as_heldout}
        masks = {u: span_masks(tokenizer, texts[u], by_id[u], spans[u]) for u in users}

        # (candidate, user, vector, texts): prompted controls carry their own texts
        rows: list[tuple[str, str, object, list]] = []

        shrunk = {}
        for uid in users:
            shared_u = population.shared_for(uid).vector
            weight = pipeline.baseline_reliability(fit.evidence[uid], population, site)
            personal = fit.users[uid].baseline.vector - shared_u
            shrunk[uid] = shared_u + weight * personal
            rows.append(
                (
                    "shrunk_baseline",
                    uid,
                    replace(fit.users[uid].baseline, vector=shrunk[uid]),
                    texts[uid],
                )
            )
        for uid in users:
            rows.append(("none", uid, None, texts[uid]))
            rows.append(("baseline", uid, fit.users[uid].baseline, texts[uid]))
            for alpha in (1.25, 1.5):  # the baseline stronger: is a win just more norm?
                stronger = replace(fit.users[uid].baseline, alpha=alpha)
                rows.append((f"baseline/alpha={alpha:g}", uid, stronger, texts[uid]))
            rows.append(("shared", uid, population.shared_for(uid), texts[uid]))
            rows.append(
                (
                    "description_prompt",
                    uid,
                    None,
                    prompted(tokenizer, validation[uid], descriptions[uid]),
                )
            )
            rows.append(
                (
                    "description_prompt_other",
                    uid,
                    None,
                    prompted(tokenizer, validation[uid], descriptions[other_of[uid]]),
                )
            )
        for construction in constructions:
            variant = SteerX(
                model, replace(base, construction=construction), cache_dir=cache, progress=False
            )
            raw = {u: variant.personal_component(fit.evidence[u], population, site) for u in users}
            halves = {
                u: [
                    variant.personal_component(h, population, site)
                    for h in _halves(fit.evidence[u])
                ]
                for u in users
            }
            present = [u for u in users if raw[u] is not None]
            versions = {"raw": raw}
            if len(present) >= 3:
                centred = {}
                for u in users:
                    others = [raw[v] for v in present if v != u]
                    centred[u] = None if raw[u] is None else raw[u] - torch.stack(others).mean(0)
                versions["centred"] = centred
            if construction in DESCRIPTION_DRIVEN:
                versions["other description"] = {
                    u: variant.personal_component(
                        with_description(fit.evidence[u], descriptions[other_of[u]]),
                        population,
                        site,
                    )
                    for u in users
                }
            for version, components in versions.items():
                for uid in users:
                    component = components[uid]
                    weight = 0.0
                    parts = halves[uid]
                    if component is not None and all(p is not None for p in parts):
                        if version == "centred":
                            others = torch.stack([raw[v] for v in present if v != uid]).mean(0)
                            parts = [p - others for p in parts]
                        weight = split_half_reliability(*parts)
                    anchors = {
                        "shared": population.shared_for(uid).vector,
                        "baseline": fit.users[uid].baseline.vector,
                        "shrunk": shrunk[uid],
                    }
                    for anchor, start_vector in anchors.items():
                        if anchor not in args.anchors.split(","):
                            continue
                        for strength in args.strengths.split(","):
                            if version == "other description" and strength != strengths[0]:
                                continue
                            scale = 1.0 if strength == "fixed" else weight
                            for r in rs:
                                vector = start_vector
                                if component is not None and scale > 0:
                                    vector = start_vector + r * norm * scale * _unit(component)
                                steer = replace(fit.users[uid].steerx, vector=vector, alpha=1.0)
                                tag = "" if version == "raw" else f"[{version}]"
                                name = f"{anchor}+{construction}{tag}/{strength}/r={r:g}"
                                rows.append((name, uid, steer, texts[uid]))
                                if anchor == "baseline" and version == "raw":
                                    # control: the baseline at this candidate's norm
                                    own = fit.users[uid].baseline
                                    ratio = float(vector.norm()) / float(own.vector.norm())
                                    matched = replace(own, vector=own.vector * ratio)
                                    rows.append(
                                        (f"baseline[norm of {name}]", uid, matched, texts[uid])
                                    )
        flat = [t for *_, ts in rows for t in ts]
        vectors = [v for _, _, v, ts in rows for _ in ts]
        nlls = iter(token_nll(model, flat, vectors, batch_size=32))
        scores: dict[str, dict[str, dict[str, float | None]]] = {}
        tokens: dict[tuple[str, str], torch.Tensor] = {}
        for name, uid, _, ts in rows:
            values = [next(nlls) for _ in ts]
            tokens[name, uid] = torch.cat(values)
            total = pooled_nll(values)
            chosen = [v[m[: v.numel()]] for v, m in zip(values, masks[uid], strict=True)]
            count = sum(c.numel() for c in chosen)
            distinct = sum(float(c.sum()) for c in chosen) / count if count else None
            scores.setdefault(name, {})[uid] = {"nll": total, "nll_distinct": distinct}
        summary = {}
        for name, per_user in scores.items():
            change = [per_user[u]["nll"] - scores["none"][u]["nll"] for u in users]
            vs_base = [per_user[u]["nll"] - scores["baseline"][u]["nll"] for u in users]
            vs_shared = [per_user[u]["nll"] - scores["shared"][u]["nll"] for u in users]
            d = [
                per_user[u]["nll_distinct"] - scores["none"][u]["nll_distinct"]
                for u in users
                if per_user[u]["nll_distinct"] is not None
            ]
            summary[name] = {
                "nll_change": float(np.mean(change)),
                "vs_baseline": float(np.mean(vs_base)),
                "vs_shared": float(np.mean(vs_shared)),
                "distinct_change": float(np.mean(d)) if d else None,
                "users_worse_than_none": int(sum(c > 0 for c in change)),
                "users_worse_than_shared": int(sum(c > 0 for c in vs_shared)),
                "users_worse_than_shared_beyond_noise": sum(
                    worse_beyond_noise(tokens[name, u], tokens["shared", u]) for u in users
                ),
                "n_users": len(users),
            }
        results[dataset] = {
            "description_quality": asdict(quality),
            "descriptions": descriptions,
            "candidates": summary,
            "per_user": scores,
        }
        print(f"\n## {dataset} ({len(users)} users, {time.perf_counter() - start:.0f} s)")
        print(f"description quality ({args.describer}): {asdict(quality)}")
        print(
            "| candidate | Δnll vs none | Δnll vs baseline | Δnll vs shared | Δnll_distinct vs "
            "none | worse than none | worse than shared | … beyond noise |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, s in sorted(summary.items(), key=lambda kv: kv[1]["nll_change"]):
            dist = "–" if s["distinct_change"] is None else f"{s['distinct_change']:+.4f}"
            print(
                f"| {name} | {s['nll_change']:+.4f} | {s['vs_baseline']:+.4f} | "
                f"{s['vs_shared']:+.4f} | {dist} | {s['users_worse_than_none']}/{s['n_users']} | "
                f"{s['users_worse_than_shared']}/{s['n_users']} | "
                f"{s['users_worse_than_shared_beyond_noise']}/{s['n_users']} |",
                flush=True,
            )
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
