"""The SteerX experiment: fit every user, evaluate every method on held-out text, write the
report. Interruptible: each user's results are written atomically to ``DIR/users/`` and a rerun
with the same configuration skips finished users.

Users are evaluated in groups (``users_per_batch``): the NLL rows of every user, method and
other user's vector of a group share forward batches (each row steered by its own vector), and
each generation method is one batched generation over the group's prompts. Rows are left-padded
and masked, so a user's numbers do not depend on which users it was batched with (up to float
rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.atomic import safe_filename, write_text
from steerx_lens.attribution import AttributionConfig
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.evaluation.metrics import (
    ALL_METHODS,
    GENERATION_METHODS,
    encode_for_eval,
    generation_scores,
    paired_stats,
    preference_masks,
    token_nll,
)
from steerx_lens.evaluation.report import write_report
from steerx_lens.evaluation.results import (
    MethodScores,
    PairedStats,
    RunMetrics,
    RunStats,
    UserRecord,
)
from steerx_lens.pipeline import FitResult, SteerX, SteerXConfig, stacked_steer
from steerx_lens.text import EncodedText, build_prompt, history_block
from steerx_lens.vectors import SteeringVector
from steerx_lens.viz import save_attribution_html

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
OWN_METHODS = ("none", "baseline", "steerx", "shared", "history_prompt")
NllKey = tuple[str, str, str | None]  # (user id, method, other user's id for *_other methods)
NllRequests = dict[NllKey, tuple[list[EncodedText], list[SteeringVector | None]]]


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
    """Runs :mod:`steerx_lens.evaluation.metrics` over users and writes ``DIR``."""

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
        users_per_batch: int = 8,
    ) -> None:
        if users_per_batch < 1:
            raise ValueError(f"users_per_batch must be >= 1, got {users_per_batch}")
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
        self.users_per_batch = users_per_batch  # not in the config: results do not depend on it
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

    def _finished(self, user_id: str) -> UserRecord | None:
        """The user's record written by an earlier run with the same configuration, if any."""
        path = self.user_file(user_id)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("config_key") != self.key:
            return None
        return UserRecord.from_json(record, ALL_METHODS)

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

    def _vectors(self, user: UserHistory, fit: FitResult) -> dict[str, SteeringVector | None]:
        """The user's own vector of every unprompted method (``none``: no vector)."""
        mine = fit.users[user.user_id]
        return {
            "none": None,
            "baseline": mine.baseline,
            "steerx": mine.steerx,
            "shared": fit.population.shared,
        }

    def _nll_requests(
        self,
        users: Sequence[UserHistory],
        fit: FitResult,
        histories: dict[str, list[HistoryItem]],
    ) -> NllRequests:
        """Every (user, method, other user) NLL evaluation: its texts and one vector per text."""
        tokenizer = self.pipeline.adapter.tokenizer
        requests: NllRequests = {}
        for user in users:
            uid, n = user.user_id, len(user.heldout)
            plain = [encode_for_eval(tokenizer, item) for item in user.heldout]
            for method, vector in self._vectors(user, fit).items():
                requests[uid, method, None] = (plain, [vector] * n)
            prompted = [encode_for_eval(tokenizer, item, histories[uid]) for item in user.heldout]
            requests[uid, "history_prompt", None] = (prompted, [None] * n)
            for mode in ("baseline", "steerx"):
                for other_id, other in fit.users.items():
                    if other_id != uid:
                        requests[uid, f"{mode}_other", other_id] = (
                            plain,
                            [getattr(other, mode)] * n,
                        )
        return requests

    def _batched_nll(
        self, requests: NllRequests
    ) -> dict[NllKey, list[Float[Tensor, " n_response"]]]:
        """All requests' per-token NLLs from one :func:`token_nll` call (rows of every user and
        method share forward batches, each row steered by its own vector)."""
        texts = [text for rows, _ in requests.values() for text in rows]
        vectors = [vector for _, rows in requests.values() for vector in rows]
        values = iter(
            token_nll(self.model, texts, vectors, batch_size=self.pipeline.config.batch_size)
        )
        return {key: [next(values) for _ in rows] for key, (rows, _) in requests.items()}

    def _generations(
        self, prompts: Sequence[str], vectors: Sequence[SteeringVector | None]
    ) -> list[str]:
        """Greedy continuations from one :func:`hooks.generate` call, row ``i`` steered by
        ``vectors[i]`` (a ``None`` row gets a zero vector, i.e. is left as it is)."""
        steered = [vector for vector in vectors if vector is not None]
        interventions: list[hooks.Steer] = []
        if steered:
            zero = replace(steered[0], vector=torch.zeros_like(steered[0].vector))
            rows = [zero if vector is None else vector for vector in vectors]
            interventions.append(stacked_steer(rows))
        out = hooks.generate(
            self.model, list(prompts), *interventions, max_new_tokens=self.max_new_tokens
        )
        return [text.strip() for text in out.texts]

    def _generation_texts(
        self,
        users: Sequence[UserHistory],
        fit: FitResult,
        histories: dict[str, list[HistoryItem]],
    ) -> dict[str, dict[str, list[str]]]:
        """Per user and generation method, the continuations of the held-out prompts: one
        batched generation per method over every user's prompts."""
        tokenizer = self.pipeline.adapter.tokenizer
        texts: dict[str, dict[str, list[str]]] = {user.user_id: {} for user in users}
        for method in GENERATION_METHODS:
            prompts: list[str] = []
            vectors: list[SteeringVector | None] = []
            for user in users:
                history = histories[user.user_id] if method == "history_prompt" else []
                vector = None if method == "history_prompt" else self._vectors(user, fit)[method]
                prompts += [
                    build_prompt(tokenizer, item.input, history or None) for item in user.heldout
                ]
                vectors += [vector] * len(user.heldout)
            generated = iter(self._generations(prompts, vectors))
            for user in users:
                texts[user.user_id][method] = [next(generated) for _ in user.heldout]
        return texts

    def evaluate_users(self, users: Sequence[UserHistory], fit: FitResult) -> dict[str, UserRecord]:
        """Every method's metrics on the users' held-out items, one record per user.

        The users are evaluated together so that batches are full: all NLLs in one
        :func:`token_nll` call, each generation method in one :func:`hooks.generate` call.
        """
        histories = {user.user_id: self.prompt_history(user) for user in users}
        nlls = self._batched_nll(self._nll_requests(users, fit, histories))
        generations = self._generation_texts(users, fit, histories) if self.generate else {}
        records: dict[str, UserRecord] = {}
        for user in users:
            uid = user.user_id
            mine = fit.users[uid]
            masks = preference_masks(
                self.model,
                user,
                fit.population.users,
                config=AttributionConfig(
                    k_counterfactual=self.pipeline.config.k_counterfactual,
                    max_context_tokens=self.pipeline.config.max_context_tokens,
                    batch_size=self.pipeline.config.batch_size,
                ),
            )
            references = [item.output for item in user.heldout]
            scores: dict[str, MethodScores] = {}
            for method in OWN_METHODS:
                values = nlls[uid, method, None]
                texts = generations[uid].get(method) if self.generate else None
                scores[method] = MethodScores(
                    _pooled_nll(values),
                    _pooled_nll(values, masks),
                    None if texts is None else generation_scores(texts, references),
                )
            others = [other_id for other_id in fit.users if other_id != uid]
            for mode in ("baseline", "steerx") if others else ():
                per_other = [nlls[uid, f"{mode}_other", other_id] for other_id in others]
                scores[f"{mode}_other"] = MethodScores(
                    _mean([_pooled_nll(values) for values in per_other]),
                    _mean([_pooled_nll(values, masks) for values in per_other]),
                )
            records[uid] = UserRecord(
                user_id=uid,
                config_key=self.key,
                n_heldout_tokens=int(sum(m.numel() for m in masks)),
                n_pref_tokens=int(sum(int(m.sum()) for m in masks)),
                description=mine.description,
                top_spans=mine.attribution.spans[:8],
                n_swapped_tokens=mine.n_swapped_tokens,
                steerx_fallback=bool(mine.steerx.extra.get("fallback")),
                scores=scores,
                generations=generations[uid] if self.generate else None,
            )
            save_attribution_html(
                mine.attribution, self.out / "attribution" / f"{self.user_file(uid).stem}.html"
            )
        return records

    # ------------------------------------------------------------------ whole run
    def run(self) -> RunMetrics:
        """Fit, evaluate (resuming finished users), aggregate, write metrics and report."""
        records = {u.user_id: r for u in self.users if (r := self._finished(u.user_id))}
        todo = [u for u in self.users if u.user_id not in records]
        failures = dict(self.skipped)
        if todo:
            fit = self.pipeline.fit_many(self.users)
            failures.update(fit.failures)
            fitted = [user for user in todo if user.user_id in fit.users]
            size = self.users_per_batch
            with tqdm(total=len(fitted), desc="evaluating users", disable=not self.progress) as bar:
                for start in range(0, len(fitted), size):
                    group = self.evaluate_users(fitted[start : start + size], fit)
                    for user_id, record in group.items():
                        write_text(self.user_file(user_id), json.dumps(record.to_json(), indent=1))
                    records.update(group)
                    bar.update(len(group))
        metrics = aggregate(
            [records[u.user_id] for u in self.users if u.user_id in records], self.config, failures
        )
        write_text(self.out / METRICS_FILE, json.dumps(metrics.to_json(), indent=2))
        write_report(metrics, self.out)
        return metrics


def aggregate(
    records: Sequence[UserRecord], config: dict[str, Any], failures: dict[str, str]
) -> RunMetrics:
    """Macro-average every method over users and compute the paired statistics."""
    scores = [{m: s.as_dict() for m, s in record.scores.items()} for record in records]
    methods: dict[str, dict[str, float | None]] = {}
    for method in ALL_METHODS:
        present = [r[method] for r in scores if method in r]
        if not present:
            continue
        keys = sorted({k for entry in present for k in entry})
        methods[method] = {k: _mean([entry.get(k) for entry in present]) for k in keys}

    def paired(a: str, b: str, metric: str) -> PairedStats | None:
        pairs = [
            (r[a][metric], r[b][metric])
            for r in scores
            if a in r and b in r and r[a].get(metric) is not None and r[b].get(metric) is not None
        ]
        if not pairs:
            return None
        return paired_stats([x - y for x, y in pairs])

    stats = RunStats(
        personalization_margin={
            mode: {m: paired(f"{mode}_other", mode, m) for m in ("nll", "nll_pref")}
            for mode in ("baseline", "steerx")
        },
        gain_over={
            reference: {
                mode: {m: paired(reference, mode, m) for m in ("nll", "nll_pref")}
                for mode in ("baseline", "steerx", "shared", "history_prompt")
                if mode != reference
            }
            for reference in ("none", "shared", "baseline")
        },
    )
    return RunMetrics(config, methods, list(records), stats, failures)
