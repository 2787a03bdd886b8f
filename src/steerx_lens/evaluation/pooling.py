"""Pool evaluation runs on disjoint time windows of the same users into one analysis.

One run scores a few held-out items per user. Runs on disjoint windows of a time-ordered source
(``steerx eval --window k``, :func:`~steerx_lens.data.splits.time_window`) repeat the whole
protocol (fit, choose alpha on validation items, score held-out items) on other, older items.
Pooling concatenates each user's per-item values over the runs, so the user stays the unit of
every test (Wilcoxon over users, bootstrap over users then items) while each user's value rests
on more items. Runs may differ only in their window and in what each chose on its own
validation items; pooling two runs of one window would count the same items twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerx_lens.errors import DataError
from steerx_lens.evaluation.experiment import METRICS_FILE, aggregate
from steerx_lens.evaluation.results import ItemValues, RunMetrics, UserRecord

PER_RUN_KEYS = ("window", "cells", "strength_choice", "users")
"""Config keys a pooled run may differ in: its window, the cells its own validation items chose
and the users it could evaluate (only users evaluated in every run are pooled)."""


def read_run(run: str | Path) -> dict[str, Any]:
    """A finished evaluation: its folder's ``metrics.json``, or such a file itself (the full
    form, with per-item values)."""
    path = Path(run) if Path(run).is_file() else Path(run) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: not a finished `steerx eval` folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("per_user"), list):
        raise DataError(f"{path} has no per_user records (a summary cannot be pooled)")
    return metrics


def _window(config: Mapping[str, Any]) -> int:
    """A run's window; runs written before windows existed scored the newest (0)."""
    return int(config.get("window") or 0)


def _shared(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run's config every pooled run must have alike."""
    return {k: v for k, v in config.items() if k not in PER_RUN_KEYS}


def _check_poolable(runs: Sequence[Mapping[str, Any]], windows: Sequence[int]) -> None:
    if len(runs) < 2:
        raise DataError(f"pooling needs at least 2 runs, got {len(runs)}")
    first = _shared(runs[0]["config"])
    for i, run in enumerate(runs[1:], start=1):
        other = _shared(run["config"])
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differ:
            raise DataError(f"run {i} differs from run 0 in {differ}: only windows may differ")
    repeated = sorted({w for w in windows if windows.count(w) > 1})
    if repeated:
        raise DataError(f"window(s) {repeated} given twice: their items would count twice")


def pool_records(per_run: Sequence[UserRecord], windows: Sequence[int]) -> UserRecord:
    """One user's records from several windows (``windows[i]`` is run i's) as one record: per
    method and metric present in every run, the items of all runs in run order; token counts
    summed, steering norms averaged, descriptions kept per window."""
    first = per_run[0]
    methods = set.intersection(*(set(r.items) for r in per_run))
    items = {}
    for method in (m for m in first.items if m in methods):
        metrics = set.intersection(*(set(r.items[method]) for r in per_run))
        items[method] = {
            metric: ItemValues(
                [v for r in per_run for v in r.items[method][metric].values],
                [w for r in per_run for w in r.items[method][metric].weights],
            )
            for metric in first.items[method]
            if metric in metrics
        }
    norms = {
        method: sum(r.steering_norm[method] for r in per_run) / len(per_run)
        for method in first.steering_norm
        if all(method in r.steering_norm for r in per_run)
    }
    generations = None
    if all(r.generations is not None for r in per_run):
        generations = {
            method: [text for r in per_run for text in r.generations[method]]  # type: ignore[index]
            for method in items
            if all(method in (r.generations or {}) for r in per_run)
        }
    mask_keys = set.union(*(set(r.mask_tokens) for r in per_run))
    return UserRecord(
        user_id=first.user_id,
        config_key="+".join(r.config_key for r in per_run),
        n_heldout_tokens=sum(r.n_heldout_tokens for r in per_run),
        mask_tokens={k: sum(r.mask_tokens.get(k, 0) for r in per_run) for k in sorted(mask_keys)},
        description="\n".join(
            f"window {w}: {r.description}" for w, r in zip(windows, per_run, strict=True)
        ),
        top_spans=[span for r in per_run for span in r.top_spans],
        n_swapped_tokens=sum(r.n_swapped_tokens for r in per_run),
        steerx_fallback=any(r.steerx_fallback for r in per_run),
        items=items,
        steering_norm=norms,
        generations=generations,
    )


def pool_runs(runs: Sequence[Mapping[str, Any]], n_boot: int = 2000) -> RunMetrics:
    """Runs (``metrics.json`` dicts) of one configuration on disjoint windows, as one run:
    each user evaluated in every run pooled over its items, every comparison, the goal family
    and the generation check recomputed; users missing from a run are listed in ``failures``."""
    windows = [_window(run["config"]) for run in runs]
    _check_poolable(runs, windows)
    records = [{u["user_id"]: UserRecord.from_json(u) for u in run["per_user"]} for run in runs]
    order = [uid for uid in records[0] if all(uid in r for r in records)]
    failures: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    for run, window, by_user in zip(runs, windows, records, strict=True):
        for uid, why in run.get("failures", {}).items():
            failures[f"{uid} (window {window})"] = why
        for uid, items in run.get("skipped_items", {}).items():
            skipped[f"{uid} (window {window})"] = items
        for uid in by_user:
            if uid not in order:
                failures.setdefault(uid, "not evaluated in every pooled run")
    if not order:
        raise DataError("no user was evaluated in every pooled run")
    pooled = [pool_records([r[uid] for r in records], windows) for uid in order]
    config = _shared(runs[0]["config"])
    config.update(
        window=windows,
        users=order,
        cells={},
        pooled_runs=[
            {
                "window": window,
                "cells": run["config"].get("cells", {}),
                "strength_choice": run["config"].get("strength_choice"),
            }
            for run, window in zip(runs, windows, strict=True)
        ],
    )
    return aggregate(pooled, config, failures, skipped, n_boot=n_boot)
