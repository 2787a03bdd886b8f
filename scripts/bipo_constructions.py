"""Run: OMP_NUM_THREADS=2 .venv/bin/python scripts/bipo_constructions.py (after `steerx eval --data
health_tweets --backbone bipo --users 8 --out /tmp/bipo_health`, whose fit it reads).

BiPO constructions on validation items (health tweets, the 8 accounts of the BiPO run): the
fit (BiPO baselines, minimal-pair directions) is read back from that run's cache; the
description_pairs direction (and its other-description control) is trained here."""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from dataclasses import replace

import numpy as np
import torch

from steerx_lens.constructions import with_description
from steerx_lens.data import load_users
from steerx_lens.evaluation.distinct import heldout_distinct_spans
from steerx_lens.evaluation.experiment import Experiment
from steerx_lens.evaluation.masks import span_masks
from steerx_lens.evaluation.metrics import encode_for_eval, pooled_nll, token_nll
from steerx_lens.models import load_demo_model
from steerx_lens.pipeline import SteerX, SteerXConfig, _unit

sys.path.insert(0, os.path.dirname(__file__))
from choose_defaults import worse_beyond_noise

t0 = time.time()
model = load_demo_model()
users = load_users("health_tweets", n_users=8)
config = SteerXConfig(backbone="bipo")
exp = Experiment(model, users, "/tmp/bipo_health", config, alphas=(0.0, 0.5, 1.0), progress=False)
fit = exp.fit_at(12)
print("fit loaded", time.time() - t0, "users", len(fit.users), flush=True)
population, tok = fit.population, exp.pipeline.adapter.tokenizer
site, norm = population.site, population.residual_norm
ids = sorted(u for u in exp.validation if u in fit.users)
partner = {u: ids[(i + 1) % len(ids)] for i, u in enumerate(ids)}
variant = SteerX(
    model,
    replace(exp.pipeline.config, construction="description_pairs"),
    cache_dir=exp.out / "cache",
    progress=False,
)
comp = {}
for u in ids:
    ev = fit.evidence[u]
    comp[u, "own"] = variant.personal_component(ev, population, site)
    comp[u, "other"] = variant.personal_component(
        with_description(ev, fit.users[partner[u]].description), population, site
    )
    print(u, "trained", time.time() - t0, flush=True)
texts = {u: [encode_for_eval(tok, i) for i in exp.validation[u]] for u in ids}
train = [replace(x, heldout=exp.validation[x.user_id]) for x in exp.users if x.user_id in ids]
spans = heldout_distinct_spans(train)
masks = {x.user_id: span_masks(tok, texts[x.user_id], x, spans[x.user_id]) for x in train}
rows = []
for u in ids:
    b = fit.users[u].baseline
    rows += [
        ("none", u, None),
        ("baseline", u, b),
        ("shared", u, population.shared_for(u)),
        ("steerx (minimal_pairs, the BiPO default)", u, fit.users[u].steerx),
    ]
    for who in ("own", "other"):
        c = comp[u, who]
        for r in (0.05, 0.1):
            v = b.vector if c is None else b.vector + r * norm * _unit(c)
            tag = "" if who == "own" else "[other description]"
            rows.append((f"baseline+description_pairs{tag}/fixed/r={r}", u, replace(b, vector=v)))
flat = [t for _, u, _ in rows for t in texts[u]]
vecs = [v for _, u, v in rows for _ in texts[u]]
nlls = iter(token_nll(model, flat, vecs, batch_size=32))
scores, tokens = {}, {}
for name, u, _ in rows:
    vals = [next(nlls) for _ in texts[u]]
    tokens[name, u] = torch.cat(vals)
    ch = [v[m[: v.numel()]] for v, m in zip(vals, masks[u], strict=True)]
    cnt = sum(c.numel() for c in ch)
    scores.setdefault(name, {})[u] = {
        "nll": pooled_nll(vals),
        "nll_distinct": sum(float(c.sum()) for c in ch) / cnt if cnt else None,
    }
summary = {}
for name, per in scores.items():
    ch = [per[u]["nll"] - scores["none"][u]["nll"] for u in ids]
    d = [
        per[u]["nll_distinct"] - scores["none"][u]["nll_distinct"]
        for u in ids
        if per[u]["nll_distinct"] is not None
    ]
    summary[name] = {
        "nll_change": float(np.mean(ch)),
        "distinct_change": float(np.mean(d)) if d else None,
        "users_worse_than_none": int(sum(c > 0 for c in ch)),
        "users_worse_than_shared_beyond_noise": int(
            sum(worse_beyond_noise(tokens[name, u], tokens["shared", u]) for u in ids)
        ),
        "n_users": len(ids),
    }
print(f"## health_tweets, BiPO, {len(ids)} users ({time.time() - t0:.0f} s)")
for name, s in sorted(summary.items(), key=lambda kv: kv[1]["nll_change"]):
    dd = "–" if s["distinct_change"] is None else f"{s['distinct_change']:+.4f}"
    print(
        f"| {name} | {s['nll_change']:+.4f} | {dd} | {s['users_worse_than_none']}/{s['n_users']} | {s['users_worse_than_shared_beyond_noise']}/{s['n_users']} |",
        flush=True,
    )
json.dump(
    {"summary": summary, "per_user": scores, "descriptions_from": partner},
    open("docs/evidence/bipo_constructions_health8.json", "w"),
    indent=1,
)
