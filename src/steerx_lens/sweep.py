"""Layer × strength sweeps on *validation* items (never the held-out ones).

Each user's last ``n_validation`` history items are set aside; vectors are fitted on the rest
(the users passed to the pipeline carry no held-out items at all) and every method is scored by
its NLL change on the validation items: ``NLL(method) − NLL(none)`` (negative = better).
The per-user evidence (attribution, the model's answers, minimal pairs) does not depend on the
layer: it is computed at the first layer and reused at every other one; each layer's cell is
built from that evidence and the layer's site, the pipeline's config is never changed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from steerx_lens.atomic import write_text
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.evaluation.metrics import encode_for_eval, token_nll
from steerx_lens.evidence import UserEvidence
from steerx_lens.figures import new_figure, save_png
from steerx_lens.pipeline import SteerX, SteerXConfig
from steerx_lens.vectors import SteeringVector

DEFAULT_RS = (0.05, 0.1, 0.15, 0.2)
SWEEP_METHODS = ("baseline", "shared", "steerx")


def split_users(
    users: Sequence[UserHistory], n_validation: int
) -> tuple[list[UserHistory], dict[str, list[HistoryItem]]]:
    """Training users (history minus the last ``n_validation`` items, *no held-out items*) and
    each user's validation items. Users with fewer than ``n_validation + 2`` history items are
    left out (at least 2 items must remain to train on)."""
    train, validation = [], {}
    for user in users:
        if len(user.history) < n_validation + 2:
            continue
        history, held_apart = user.split_validation(n_validation)
        train.append(UserHistory(user.user_id, history, [], dict(user.meta)))
        validation[user.user_id] = held_apart
    if len(train) < 2:
        raise ValueError(f"a sweep needs at least 2 users with > {n_validation + 1} history items")
    return train, validation


def run_sweep(
    model: Any,
    users: Sequence[UserHistory],
    layers: Sequence[int],
    alphas: Sequence[float],
    out: str | Path,
    config: SteerXConfig | None = None,
    rs: Sequence[float] = DEFAULT_RS,
    n_validation: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Sweep layers × alphas (× r for SteerX); write ``sweep.json``, ``best.json`` and plots."""
    out = Path(out)
    train, validation = split_users(users, n_validation)
    pipeline = SteerX(model, config, cache_dir=out / "cache", progress=False)
    tokenizer = pipeline.adapter.tokenizer
    texts = {
        uid: [encode_for_eval(tokenizer, item) for item in items]
        for uid, items in validation.items()
    }

    def mean_nll(user_id: str, vector: SteeringVector | None) -> float:
        nll = token_nll(
            model,
            texts[user_id],
            [vector] * len(texts[user_id]),
            batch_size=pipeline.config.batch_size,
        )
        return float(torch.cat(nll).mean())

    none = {uid: mean_nll(uid, None) for uid in validation}
    grid = {m: np.full((len(layers), len(alphas)), np.nan) for m in SWEEP_METHODS}
    steerx_by_r = np.full((len(rs), len(layers), len(alphas)), np.nan)
    evidence: dict[str, UserEvidence] = {}
    for li, layer in enumerate(tqdm(layers, desc="sweep layers", disable=not progress)):
        fit = pipeline.fit_many(train, site=pipeline.config.site_at(layer), evidence=evidence)
        evidence = fit.evidence
        shared, norm = fit.population.shared, fit.population.residual_norm
        for ai, alpha in enumerate(alphas):
            changes: dict[str, list[float]] = {m: [] for m in ("baseline", "shared")}
            by_r: list[list[float]] = [[] for _ in rs]
            for uid, fitted in fit.users.items():
                changes["baseline"].append(
                    mean_nll(uid, replace(fitted.baseline, alpha=alpha)) - none[uid]
                )
                changes["shared"].append(mean_nll(uid, replace(shared, alpha=alpha)) - none[uid])
                for ri, r in enumerate(rs):
                    by_r[ri].append(
                        mean_nll(uid, fitted.steerx_at(shared, alpha, r, norm)) - none[uid]
                    )
            grid["baseline"][li, ai] = np.mean(changes["baseline"])
            grid["shared"][li, ai] = np.mean(changes["shared"])
            for ri in range(len(rs)):
                steerx_by_r[ri, li, ai] = np.mean(by_r[ri])
    best_r, best_layer, best_alpha = np.unravel_index(np.nanargmin(steerx_by_r), steerx_by_r.shape)
    grid["steerx"] = steerx_by_r[best_r]
    best = {
        "layer": int(layers[best_layer]),
        "alpha": float(alphas[best_alpha]),
        "r": float(rs[best_r]),
        "validation_nll_change": float(steerx_by_r[best_r, best_layer, best_alpha]),
        # the controls at the same cell: does SteerX's choice beat them?
        "baseline_nll_change": float(grid["baseline"][best_layer, best_alpha]),
        "shared_nll_change": float(grid["shared"][best_layer, best_alpha]),
    }
    result = {
        "layers": list(layers),
        "alphas": list(alphas),
        "rs": list(rs),
        "n_validation": n_validation,
        "validation_users": sorted(validation),
        "nll_none": none,
        "nll_change": {m: grid[m].tolist() for m in SWEEP_METHODS},
        "steerx_nll_change_by_r": steerx_by_r.tolist(),
        "best": best,
    }
    write_text(out / "sweep.json", json.dumps(result, indent=2))
    write_text(out / "best.json", json.dumps(best, indent=2))
    plot_sweep(result, out)
    return result


def plot_sweep(result: dict[str, Any], out: Path) -> None:
    """``heatmap_<method>.png`` (layers × alphas of NLL change) and ``by_layer.png``."""
    layers, alphas = result["layers"], result["alphas"]
    for method in SWEEP_METHODS:
        values = np.asarray(result["nll_change"][method])
        limit = max(float(np.nanmax(np.abs(values))), 1e-6)
        figure = new_figure(1.2 * len(alphas) + 2.5, 0.45 * len(layers) + 1.8)
        axis = figure.subplots()
        image = axis.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        axis.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_xlabel("alpha")
        axis.set_ylabel("layer")
        title = f"{method}: validation NLL change vs none"
        if method == "steerx":
            title += f" (r={result['best']['r']:g})"
        axis.set_title(title + "\n(blue = better)", fontsize=9)
        for (i, j), value in np.ndenumerate(values):
            axis.text(j, i, f"{value:+.3f}", ha="center", va="center", fontsize=7)
        figure.colorbar(image, ax=axis)
        figure.tight_layout()
        save_png(figure, out / f"heatmap_{method}.png")
    figure = new_figure(6, 3.6)
    axis = figure.subplots()
    for method in SWEEP_METHODS:
        values = np.asarray(result["nll_change"][method])
        axis.plot(layers, np.nanmin(values, axis=1), marker="o", label=method)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("layer")
    axis.set_ylabel("best NLL change over alphas")
    axis.set_title("Validation NLL change per layer (lower is better)")
    axis.legend()
    figure.tight_layout()
    save_png(figure, out / "by_layer.png")


def parse_layers(spec: str) -> list[int]:
    """``"4:24:2"`` (start:stop:step, stop exclusive) or ``"8,12,16"``."""
    if ":" in spec:
        parts = [int(p) for p in spec.split(":")]
        return list(range(*parts))
    return [int(p) for p in spec.split(",") if p]
