"""Layer × strength (× r) sweeps on *validation* items, each method tuned on its own.

Items keep their fixed roles (:mod:`steerx_lens.data.splits`): vectors are fitted on each user's
fit items, every cell is scored by its NLL change on the user's validation items,
``NLL(method) − NLL(none)`` (negative = better), and held-out items are never read (the users
given to the pipeline carry none). Every steered method
(:data:`~steerx_lens.evaluation.cells.STEERED_METHODS`) gets its own best cell, so the baseline
is not judged at a cell chosen for SteerX; ``best.json`` records one cell per method and
``steerx eval --best`` applies each.

Cost: the per-user evidence (attribution, the model's answers, minimal pairs) does not depend on
the layer and is computed once; each text's activations at every sweep layer are read in one
pass (:func:`~steerx_lens.backbones.shared_reads`), so the fits at later layers run no forward
pass; at each layer the cells of every method, strength and ``r`` are
scored in one batched :func:`~steerx_lens.evaluation.metrics.token_nll` call, each row steered by
its own vector, where the blocks below the layer run once per validation text (on backends that
can start a pass mid-stack) and every cell pays only for the blocks from the layer up; cells at
``alpha = 0`` are not scored (their change is 0). See docs/benchmarks.md. Sign-flip check: each
method's best cell is also scored at ``−alpha``; steering that helps at ``+alpha`` should hurt
at ``−alpha``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steerx_lens.atomic import write_text
from steerx_lens.backbones import shared_reads
from steerx_lens.data import (
    DEFAULT_N_VALIDATION,
    HistoryItem,
    UserHistory,
    fit_split,
    has_validation,
)
from steerx_lens.evaluation.cells import R_METHODS, STEERED_METHODS
from steerx_lens.evaluation.metrics import encode_for_eval, pooled_nll, token_nll
from steerx_lens.evidence import UserEvidence
from steerx_lens.figures import new_figure, save_png
from steerx_lens.pipeline import FitResult, SteerX, SteerXConfig
from steerx_lens.vectors import SteeringVector

DEFAULT_RS = (0.05, 0.1, 0.15, 0.2)
SWEEP_METHODS = STEERED_METHODS


def split_users(
    users: Sequence[UserHistory], n_validation: int
) -> tuple[list[UserHistory], dict[str, list[HistoryItem]]]:
    """Training users (their fit items, *no held-out items*) and each user's validation items
    (:func:`~steerx_lens.data.fit_split`). Users without validation items are left out."""
    train, validation = [], {}
    for user in users:
        if not has_validation(user, n_validation):
            continue
        fit, held_apart = fit_split(user, n_validation)
        train.append(replace(fit, heldout=[]))
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
    n_validation: int = DEFAULT_N_VALIDATION,
    progress: bool = True,
) -> dict[str, Any]:
    """Sweep layers × alphas (× r where it applies) for every method; write ``sweep.json``,
    ``best.json`` and plots. Each method's grid is ``[r][layer][alpha]`` (one ``r`` row for
    methods without ``r``)."""
    out = Path(out)
    train, validation = split_users(users, n_validation)
    pipeline = SteerX(model, config, cache_dir=out / "cache", progress=False)
    tokenizer, batch_size = pipeline.adapter.tokenizer, pipeline.config.batch_size
    texts = {
        uid: [encode_for_eval(tokenizer, item) for item in items]
        for uid, items in validation.items()
    }

    def mean_nlls(rows: list[tuple[str, SteeringVector | None]]) -> list[float]:
        """Per (user, vector) row: the user's validation NLL (token mean) under the vector,
        all rows in one batched call."""
        flat = [text for uid, _ in rows for text in texts[uid]]
        vectors = [vector for uid, vector in rows for _ in texts[uid]]
        values = iter(token_nll(model, flat, vectors, batch_size=batch_size))
        means = []
        for uid, _ in rows:
            nll = [next(values) for _ in texts[uid]]
            means.append(pooled_nll(nll))
        return means

    user_ids = sorted(validation)
    none = dict(zip(user_ids, mean_nlls([(uid, None) for uid in user_ids]), strict=True))
    r_axis = {m: (list(rs) if m in R_METHODS else [None]) for m in SWEEP_METHODS}
    grids = {m: np.full((len(r_axis[m]), len(layers), len(alphas)), np.nan) for m in SWEEP_METHODS}
    norms: dict[int, float] = {}
    fits: dict[int, FitResult] = {}
    evidence: dict[str, UserEvidence] = {}
    # a text's activations at every layer come from one pass (the fits at later layers reuse it)
    with shared_reads(model, [pipeline.config.site_at(layer) for layer in layers]):
        for li, layer in enumerate(tqdm(layers, desc="sweep layers", disable=not progress)):
            fit = pipeline.fit_many(train, site=pipeline.config.site_at(layer), evidence=evidence)
            evidence, fits[layer], norms[layer] = fit.evidence, fit, fit.population.residual_norm
            fitted = [uid for uid in user_ids if uid in fit.users]
            for method in SWEEP_METHODS:  # alpha 0 adds nothing: the change is 0 by definition
                grids[method][:, li, [ai for ai, alpha in enumerate(alphas) if alpha == 0]] = 0.0
            cells = [
                (method, ri, ai)
                for method in SWEEP_METHODS
                for ri in range(len(r_axis[method]))
                for ai in range(len(alphas))
                if alphas[ai] != 0
            ]
            rows = [
                (uid, pipeline.method_vector(fit, uid, m, alphas[ai], r_axis[m][ri]))
                for m, ri, ai in cells
                for uid in fitted
            ]
            values = iter(mean_nlls(rows))
            for method, ri, ai in cells:
                changes = [next(values) - none[uid] for uid in fitted]
                grids[method][ri, li, ai] = float(np.mean(changes))
    best: dict[str, dict[str, Any]] = {}
    for method in SWEEP_METHODS:
        ri, li, ai = np.unravel_index(np.nanargmin(grids[method]), grids[method].shape)
        r = r_axis[method][ri]
        best[method] = {
            "layer": int(layers[li]),
            "alpha": float(alphas[ai]),
            **({"r": float(r)} if r is not None else {}),
            "validation_nll_change": float(grids[method][ri, li, ai]),
        }
    flips = _sign_flip_check(pipeline, fits, best, none, mean_nlls)
    for method, entry in best.items():
        entry["relative_strength"] = flips[method].pop("relative_strength")
    result = {
        "layers": list(layers),
        "alphas": list(alphas),
        "rs": list(rs),
        "n_validation": n_validation,
        "validation_users": user_ids,
        "residual_norm": {str(layer): norm for layer, norm in norms.items()},
        "nll_none": none,
        "nll_change": {m: grids[m].tolist() for m in SWEEP_METHODS},
        "sign_flip": flips,
        "best": {"methods": best},
    }
    write_text(out / "sweep.json", json.dumps(result, indent=2))
    write_text(out / "best.json", json.dumps(result["best"], indent=2))
    plot_sweep(result, out)
    return result


def _sign_flip_check(
    pipeline: SteerX,
    fits: dict[int, FitResult],
    best: dict[str, dict[str, Any]],
    none: dict[str, float],
    mean_nlls: Any,
) -> dict[str, dict[str, Any]]:
    """Each method's best cell at ``−alpha`` (and its strength ``‖alpha·v‖ / ‖h‖``, mean over
    users): ``passed`` when the NLL change there is above the one at ``+alpha``."""
    checks: dict[str, dict[str, Any]] = {}
    for method, cell in best.items():
        fit = fits[cell["layer"]]
        users = [uid for uid in sorted(none) if uid in fit.users]
        vectors = [
            pipeline.method_vector(fit, uid, method, -cell["alpha"], cell.get("r")) for uid in users
        ]
        flipped = mean_nlls(list(zip(users, vectors, strict=True)))
        change = float(np.mean([v - none[uid] for v, uid in zip(flipped, users, strict=True)]))
        norm = fit.population.residual_norm
        checks[method] = {
            "alpha": -cell["alpha"],
            "validation_nll_change": change,
            "passed": bool(change > cell["validation_nll_change"]),
            "relative_strength": float(np.mean([abs(v.alpha) * v.norm() / norm for v in vectors])),
        }
    return checks


def plot_sweep(result: dict[str, Any], out: Path) -> None:
    """``heatmap_<method>.png`` (layers × alphas of NLL change, at the method's best ``r``)
    and ``by_layer.png``."""
    layers, alphas = result["layers"], result["alphas"]
    rs = result["rs"]
    best = result["best"]["methods"]
    for method in SWEEP_METHODS:
        grid = np.asarray(result["nll_change"][method])
        r = best[method].get("r")
        values = grid[rs.index(r)] if r is not None else grid[0]
        limit = max(float(np.nanmax(np.abs(values))), 1e-6)
        figure = new_figure(1.2 * len(alphas) + 2.5, 0.45 * len(layers) + 1.8)
        axis = figure.subplots()
        image = axis.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        axis.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_xlabel("alpha")
        axis.set_ylabel("layer")
        title = f"{method}: validation NLL change vs none" + (f" (r={r:g})" if r else "")
        axis.set_title(title + "\n(blue = better)", fontsize=9)
        for (i, j), value in np.ndenumerate(values):
            axis.text(j, i, f"{value:+.3f}", ha="center", va="center", fontsize=7)
        figure.colorbar(image, ax=axis)
        figure.tight_layout()
        save_png(figure, out / f"heatmap_{method}.png")
    figure = new_figure(6, 3.6)
    axis = figure.subplots()
    for method in SWEEP_METHODS:
        grid = np.asarray(result["nll_change"][method])
        axis.plot(layers, np.nanmin(grid, axis=(0, 2)), marker="o", label=method)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("layer")
    axis.set_ylabel("best NLL change over alphas (and r)")
    axis.set_title("Validation NLL change per layer (lower is better)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_png(figure, out / "by_layer.png")


def parse_layers(spec: str) -> list[int]:
    """``"4:24:2"`` (start:stop:step, stop exclusive) or ``"8,12,16"``."""
    if ":" in spec:
        parts = [int(p) for p in spec.split(":")]
        return list(range(*parts))
    return [int(p) for p in spec.split(",") if p]
