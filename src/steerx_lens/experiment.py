"""The SteerX experiment: fit every user, evaluate every method on held-out text, write the
report. Interruptible: each user's results are written atomically to ``DIR/users/`` and a rerun
with the same configuration skips finished users.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.atomic import safe_filename, write_text
from steerx_lens.attribution import history_block
from steerx_lens.data import HistoryItem, UserHistory, build_prompt
from steerx_lens.evaluate import (
    ALL_METHODS,
    GENERATION_METHODS,
    encode_for_eval,
    generation_scores,
    paired_stats,
    preference_masks,
    token_nll,
)
from steerx_lens.pipeline import FitResult, SteerX, SteerXConfig, stacked_steer
from steerx_lens.vectors import SteeringVector
from steerx_lens.viz import save_attribution_html

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


def config_key(config: dict[str, Any]) -> str:
    """A short hash of the run configuration: per-user files are reused only when it matches."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _pooled_nll(nlls: Sequence[Any], masks: Sequence[Any] | None = None) -> float | None:
    """Token-weighted mean NLL over a user's held-out items (optionally on masked tokens).

    A mask may be shorter than its item: attribution truncates responses that do not fit
    ``max_context_tokens``, so the mask covers the response's first tokens.
    """
    values = [
        nll if masks is None else nll[: mask.numel()][mask]
        for nll, mask in zip(nlls, masks or nlls, strict=True)
    ]
    count = sum(int(v.numel()) for v in values)
    return float(sum(float(v.sum()) for v in values) / count) if count else None


class Experiment:
    """Runs the evaluation of :mod:`steerx_lens.evaluate` over users and writes ``DIR``."""

    def __init__(
        self,
        model: Any,
        users: Sequence[UserHistory],
        out: str | Path,
        config: SteerXConfig | None = None,
        generate: bool = True,
        max_new_tokens: int = 40,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.users = [user for user in users if user.history and user.heldout]
        self.skipped = {
            u.user_id: "no history or no held-out items" for u in users if u not in self.users
        }
        self.out = Path(out)
        self.pipeline = SteerX(model, config, cache_dir=self.out / "cache", progress=progress)
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.config = {
            **asdict(self.pipeline.config),
            "generate": generate,
            "max_new_tokens": max_new_tokens,
            "users": [u.user_id for u in self.users],
            **(run_info or {}),
        }
        self.key = config_key(self.config)

    # ------------------------------------------------------------------ per user
    def user_file(self, user_id: str) -> Path:
        """Where one user's finished record is written: ``DIR/users/<safe user id>.json``."""
        return self.out / "users" / f"{safe_filename(user_id)}.json"

    def _finished(self, user_id: str) -> dict[str, Any] | None:
        path = self.user_file(user_id)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if record.get("config_key") == self.key else None

    def prompt_history(self, user: UserHistory) -> list[HistoryItem]:
        """The most recent history items whose block fits half of ``max_context_tokens``."""
        tokenizer = self.pipeline.adapter.tokenizer
        budget = self.pipeline.config.max_context_tokens // 2
        chosen: list[HistoryItem] = []
        for item in reversed(user.history):
            block = [item, *chosen]
            if len(tokenizer(history_block(block))["input_ids"]) > budget:
                break
            chosen = block
        return chosen

    def _nll(
        self,
        items: Sequence[HistoryItem],
        vectors: Sequence[SteeringVector | None],
        history: Sequence[HistoryItem] = (),
    ) -> list[Any]:
        tokenizer = self.pipeline.adapter.tokenizer
        texts = [encode_for_eval(tokenizer, item, history) for item in items]
        return token_nll(self.model, texts, vectors, batch_size=self.pipeline.config.batch_size)

    def _generations(
        self, user: UserHistory, vector: SteeringVector | None, history: Sequence[HistoryItem] = ()
    ) -> list[str]:
        tokenizer = self.pipeline.adapter.tokenizer
        prompts = [
            build_prompt(tokenizer, item.input, list(history) or None) for item in user.heldout
        ]
        interventions = [] if vector is None else [stacked_steer([vector] * len(prompts))]
        out = hooks.generate(
            self.model, prompts, *interventions, max_new_tokens=self.max_new_tokens
        )
        return [text.strip() for text in out.texts]

    def evaluate_user(self, user: UserHistory, fit: FitResult) -> dict[str, Any]:
        """Every method's metrics on one user's held-out items."""
        mine = fit.users[user.user_id]
        others = [u for uid, u in fit.users.items() if uid != user.user_id]
        heldout = user.heldout
        n = len(heldout)
        history = self.prompt_history(user)
        own: dict[str, SteeringVector | None] = {
            "none": None,
            "baseline": mine.baseline,
            "steerx": mine.steerx,
            "shared": fit.population.shared,
        }
        nlls = {method: self._nll(heldout, [vector] * n) for method, vector in own.items()}
        nlls["history_prompt"] = self._nll(heldout, [None] * n, history)
        masks = preference_masks(
            self.model,
            user,
            fit.population.users,
            k_counterfactual=self.pipeline.config.k_counterfactual,
            max_context_tokens=self.pipeline.config.max_context_tokens,
            batch_size=self.pipeline.config.batch_size,
        )
        record: dict[str, Any] = {
            "user_id": user.user_id,
            "config_key": self.key,
            "n_heldout_tokens": int(sum(m.numel() for m in masks)),
            "n_pref_tokens": int(sum(int(m.sum()) for m in masks)),
            "description": mine.description,
            "top_spans": [
                {"text": s.text, "score": s.score, "count": s.count}
                for s in mine.attribution.spans[:8]
            ],
            "n_swapped_tokens": mine.n_swapped_tokens,
            "steerx_fallback": bool(mine.steerx.extra.get("fallback")),
        }
        for method, values in nlls.items():
            record[method] = {"nll": _pooled_nll(values), "nll_pref": _pooled_nll(values, masks)}
        for mode in ("baseline", "steerx"):
            if not others:
                continue
            per_other = []
            for other in others:
                values = self._nll(heldout, [getattr(other, mode)] * n)
                per_other.append((_pooled_nll(values), _pooled_nll(values, masks)))
            record[f"{mode}_other"] = {
                "nll": _mean([a for a, _ in per_other]),
                "nll_pref": _mean([b for _, b in per_other]),
            }
        if self.generate:
            references = [item.output for item in heldout]
            record["generations"] = {}
            for method in GENERATION_METHODS:
                if method == "history_prompt":
                    texts = self._generations(user, None, history)
                else:
                    texts = self._generations(user, own[method])
                record[method].update(generation_scores(texts, references))
                record["generations"][method] = texts
        save_attribution_html(
            mine.attribution, self.out / "attribution" / f"{self.user_file(user.user_id).stem}.html"
        )
        return record

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict[str, Any]:
        """Fit, evaluate (resuming finished users), aggregate, write metrics and report."""
        records = {u.user_id: r for u in self.users if (r := self._finished(u.user_id))}
        todo = [u for u in self.users if u.user_id not in records]
        failures = dict(self.skipped)
        if todo:
            fit = self.pipeline.fit_many(self.users)
            failures.update(fit.failures)
            for user in tqdm(todo, desc="evaluating users", disable=not self.progress):
                if user.user_id not in fit.users:
                    continue
                record = self.evaluate_user(user, fit)
                write_text(self.user_file(user.user_id), json.dumps(record, indent=1))
                records[user.user_id] = record
        metrics = aggregate(
            [records[u.user_id] for u in self.users if u.user_id in records], self.config
        )
        metrics["failures"] = failures
        write_text(self.out / METRICS_FILE, json.dumps(metrics, indent=2))
        from steerx_lens.report import write_report

        write_report(metrics, self.out)
        return metrics


def aggregate(records: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Macro-average every method over users and compute the paired statistics."""
    methods: dict[str, dict[str, float | None]] = {}
    for method in ALL_METHODS:
        present = [r[method] for r in records if method in r]
        if not present:
            continue
        keys = sorted({k for entry in present for k in entry})
        methods[method] = {k: _mean([entry.get(k) for entry in present]) for k in keys}
    stats: dict[str, Any] = {}

    def paired(a: str, b: str, metric: str) -> dict[str, Any] | None:
        pairs = [
            (r[a][metric], r[b][metric])
            for r in records
            if a in r and b in r and r[a].get(metric) is not None and r[b].get(metric) is not None
        ]
        if not pairs:
            return None
        return paired_stats([x - y for x, y in pairs]).as_dict()

    stats["personalization_margin"] = {
        mode: {m: paired(f"{mode}_other", mode, m) for m in ("nll", "nll_pref")}
        for mode in ("baseline", "steerx")
    }
    for reference in ("none", "shared", "baseline"):
        stats[f"gain_over_{reference}"] = {
            mode: {m: paired(reference, mode, m) for m in ("nll", "nll_pref")}
            for mode in ("baseline", "steerx", "shared", "history_prompt")
            if mode != reference
        }
    return {"config": config, "methods": methods, "per_user": list(records), "stats": stats}
