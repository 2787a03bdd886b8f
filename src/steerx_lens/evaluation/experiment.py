"""The SteerX experiment: fit every user, evaluate every method on held-out text, write the
report.

Results are keyed by content: :attr:`Experiment.key` hashes the configuration, the model and
every user's data (the population: other users' vectors and the shared vector depend on it),
and a user's record in ``DIR/users/`` is reused only when its key matches, so editing any
user's items recomputes every user. The fit is saved as it goes under
``DIR/cache/fit-<fit key>/`` (the population, then each user's evidence and vectors), so an
interrupted or resumed run never fits a user twice. Items the pipeline cannot use are skipped
by the rule of :mod:`steerx_lens.screening`; a user whose evaluation fails on its data is
reported and the others finish; a run with no evaluable user is a :class:`DataError`. The
output folder is held with :func:`steerx_lens.runs.out_lock` while the run writes.

Users are evaluated in groups (``users_per_batch``): the NLL rows of every user, method and
other user's vector of a group share forward batches (each row steered by its own vector), and
each generation method is one batched generation over the group's prompts. Rows are left-padded
and masked, so a user's numbers do not depend on which users it was batched with (up to float
rounding).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.atomic import write_bytes, write_text
from steerx_lens.attribution import AttributionConfig
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.errors import DataError, SteerXError
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
from steerx_lens.evidence import UserEvidence
from steerx_lens.pipeline import (
    FitResult,
    Population,
    SteerX,
    SteerXConfig,
    UserSteering,
    stacked_steer,
)
from steerx_lens.runs import content_key, out_lock, user_file_names, write_name_index
from steerx_lens.screening import history_limits, screen_items
from steerx_lens.text import EncodedText, build_prompt, history_block
from steerx_lens.vectors import SteeringVector
from steerx_lens.viz import save_attribution_html

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
OWN_METHODS = ("none", "baseline", "steerx", "shared", "history_prompt")
NllKey = tuple[str, str, str | None]  # (user id, method, other user's id for *_other methods)
NllRequests = dict[NllKey, tuple[list[EncodedText], list[SteeringVector | None]]]


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
    if not count:
        return None
    value = float(sum(float(v.sum()) for v in values) / count)
    return value if math.isfinite(value) else None  # e.g. activations overflowed: no number


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
        if generate and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 with generation, got {max_new_tokens}")
        self.model = model
        self.out = Path(out)
        self.pipeline = SteerX(model, config, cache_dir=self.out / "cache", progress=progress)
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.users_per_batch = users_per_batch  # not in the config: results do not depend on it
        self.names = user_file_names([user.user_id for user in users])
        self.skipped_items: dict[str, list[str]] = {}
        self.skipped: dict[str, str] = {}
        self.users: list[UserHistory] = []
        for user in users:
            usable = self._usable(user)
            if usable.history and usable.heldout:
                self.users.append(usable)
            elif user.history and user.heldout:
                self.skipped[user.user_id] = "no usable history or no usable held-out items"
            else:
                self.skipped[user.user_id] = "no history or no held-out items"
        self.config = {
            **asdict(self.pipeline.config),
            "generate": generate,
            "max_new_tokens": max_new_tokens,
            "users": [u.user_id for u in self.users],
            **(run_info or {}),
        }
        model_id = {
            "fingerprint": self.pipeline.adapter.fingerprint(),
            "stack": type(self.pipeline.adapter).__name__,
        }
        data = content_key([user.to_dict() for user in self.users])
        fit_config = asdict(self.pipeline.config)
        self.fit_key = content_key({"config": fit_config, "model": model_id, "users": data})
        self.key = content_key({"config": self.config, "model": model_id, "users": data})

    def _usable(self, user: UserHistory) -> UserHistory:
        """``user`` without the items the run cannot use (:mod:`steerx_lens.screening`); the
        reasons go to :attr:`skipped_items` (and warnings)."""
        tokenizer = self.pipeline.adapter.tokenizer
        limits = history_limits(self.pipeline)
        history, skipped = screen_items(
            tokenizer, user.user_id, user.history, "history item", limits
        )
        usable = replace(user, history=history)
        blocks = [(), self.prompt_history(usable)] if history else [()]
        heldout_limits = replace(limits, new_tokens=self.max_new_tokens if self.generate else 0)
        heldout, also = screen_items(
            tokenizer, user.user_id, user.heldout, "held-out item", heldout_limits, blocks
        )
        if skipped or also:
            self.skipped_items[user.user_id] = skipped + also
        return replace(usable, heldout=heldout)

    # ------------------------------------------------------------------ per user
    def user_file(self, user_id: str) -> Path:
        """Where one user's finished record is written: ``DIR/users/<file name>.json``
        (:func:`~steerx_lens.runs.user_file_names`)."""
        return self.out / "users" / f"{self.names[user_id]}.json"

    def _finished(self, user_id: str) -> UserRecord | None:
        """The user's record written by an earlier run with the same key, if any."""
        try:
            record = json.loads(self.user_file(user_id).read_text(encoding="utf-8"))
            if record.get("config_key") != self.key or record.get("user_id") != user_id:
                return None
            return UserRecord.from_json(record, ALL_METHODS)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # missing or unreadable: computed again

    # ------------------------------------------------------------------ resumable fit
    @property
    def fit_dir(self) -> Path:
        """Where the fit is saved as it goes: ``DIR/cache/fit-<fit key>/``."""
        return self.out / "cache" / f"fit-{self.fit_key}"

    def _load_population(self) -> Population | None:
        """The population saved by an earlier run with the same fit key, if complete."""
        folder = self.fit_dir / "population"
        try:
            meta = json.loads((folder / "population.json").read_text(encoding="utf-8"))
            by_id = {user.user_id: user for user in self.users}
            baselines = {
                uid: SteeringVector.load(folder / f"{self.names[uid]}.baseline.safetensors")
                for uid in meta["users"]
            }
            shared = SteeringVector.load(folder / "shared.safetensors")
            users = [by_id[uid] for uid in meta["users"]]
            return Population(users, shared, meta["residual_norm"], baselines, meta["failures"])
        except (OSError, ValueError, KeyError, TypeError, SteerXError):
            return None

    def _save_population(self, population: Population) -> None:
        folder = self.fit_dir / "population"
        for uid, vector in population.baselines.items():
            vector.save(folder / f"{self.names[uid]}.baseline.safetensors")
        population.shared.save(folder / "shared.safetensors")
        meta = {
            "users": [user.user_id for user in population.users],
            "residual_norm": population.residual_norm,
            "failures": population.failures,
        }
        write_text(folder / "population.json", json.dumps(meta))  # last: marks it complete

    def _fit_user(
        self, user: UserHistory, population: Population
    ) -> tuple[UserSteering, UserEvidence]:
        """One user's vectors and evidence: loaded when saved by an earlier run, else computed
        and saved (evidence first, then the vectors; the SteerX vector marks them complete)."""
        stem = self.fit_dir / "users" / self.names[user.user_id]
        evidence_file, direction_file = (
            Path(f"{stem}.{p}.safetensors") for p in ("evidence", "direction")
        )
        vectors = {mode: Path(f"{stem}.{mode}.safetensors") for mode in ("baseline", "steerx")}
        try:
            evidence = UserEvidence.load(evidence_file)
        except SteerXError:
            evidence = self.pipeline.evidence(user, population)
            evidence.save(evidence_file)
        try:
            baseline, steerx = (SteeringVector.load(vectors[m]) for m in ("baseline", "steerx"))
            direction = None
            if direction_file.exists():
                direction = load_file(str(direction_file))["direction"]
            pairs = evidence.pairs.n_swapped_tokens
            return (
                UserSteering(
                    user.user_id, evidence.attribution, baseline, steerx, pairs, direction
                ),
                evidence,
            )
        except (SteerXError, SafetensorError, OSError, KeyError):
            pass  # not saved yet (or unreadable): computed below
        fitted = self.pipeline.vectors(evidence, population)
        if fitted.personal_direction is not None:
            tensors = {"direction": fitted.personal_direction.contiguous()}
            write_bytes(direction_file, save(tensors))
        fitted.baseline.save(vectors["baseline"])
        fitted.steerx.save(vectors["steerx"])
        return fitted, evidence

    def fit(self) -> FitResult:
        """Every user's evidence and vectors, as :meth:`SteerX.fit_many` computes them, resumed
        from :attr:`fit_dir` (what an earlier run with the same fit key saved is reused)."""
        population = self._load_population()
        if population is None:
            population = self.pipeline.build_population(self.users)
            self._save_population(population)
        failures = dict(population.failures)
        fitted: dict[str, UserSteering] = {}
        evidence: dict[str, UserEvidence] = {}
        for user in tqdm(population.users, desc="SteerX users", disable=not self.progress):
            try:
                fitted[user.user_id], evidence[user.user_id] = self._fit_user(user, population)
            except (SteerXError, ValueError) as error:
                failures[user.user_id] = f"{type(error).__name__}: {error}"
        return FitResult(population, fitted, failures, evidence)

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
                mine.attribution, self.out / "attribution" / f"{self.names[uid]}.html"
            )
        return records

    def _evaluate_isolated(
        self, users: Sequence[UserHistory], fit: FitResult, failures: dict[str, str]
    ) -> dict[str, UserRecord]:
        """:meth:`evaluate_users`; if a user's data makes it fail, each user alone, the ones
        that fail listed in ``failures``."""
        try:
            return self.evaluate_users(users, fit)
        except ValueError as error:
            if len(users) == 1:
                failures[users[0].user_id] = f"{type(error).__name__}: {error}"
                return {}
        records: dict[str, UserRecord] = {}
        for user in users:
            records.update(self._evaluate_isolated([user], fit, failures))
        return records

    # ------------------------------------------------------------------ whole run
    def run(self) -> RunMetrics:
        """Fit, evaluate (reusing finished users), aggregate, write metrics and report."""
        if not self.users:
            reasons = "; ".join(f"{uid}: {why}" for uid, why in list(self.skipped.items())[:5])
            raise DataError(f"no user has both usable history and held-out items ({reasons})")
        with out_lock(self.out):
            records = {u.user_id: r for u in self.users if (r := self._finished(u.user_id))}
            reused = len(records)
            todo = [u for u in self.users if u.user_id not in records]
            failures = dict(self.skipped)
            if todo:
                fit = self.fit()
                failures.update(fit.failures)
                fitted = [user for user in todo if user.user_id in fit.users]
                write_name_index(self.out, self.names)
                size = self.users_per_batch
                bar = tqdm(total=len(fitted), desc="evaluating users", disable=not self.progress)
                with bar:
                    for start in range(0, len(fitted), size):
                        group = self._evaluate_isolated(fitted[start : start + size], fit, failures)
                        for user_id, record in group.items():
                            write_text(
                                self.user_file(user_id), json.dumps(record.to_json(), indent=1)
                            )
                        records.update(group)
                        bar.update(len(fitted[start : start + size]))
            evaluated = [records[u.user_id] for u in self.users if u.user_id in records]
            if not evaluated:
                reasons = "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:5])
                raise DataError(f"no user could be evaluated ({reasons})")
            metrics = aggregate(evaluated, self.config, failures, self.skipped_items)
            write_text(self.out / METRICS_FILE, json.dumps(metrics.to_json(), indent=2))
            note = (
                f"{reused} of {len(evaluated)} users reused from an earlier run with the same "
                "data, model and configuration; the others computed in this run."
            )
            write_report(metrics, self.out, self.names, [note])
        return metrics


def aggregate(
    records: Sequence[UserRecord],
    config: dict[str, Any],
    failures: dict[str, str],
    skipped_items: dict[str, list[str]] | None = None,
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
    return RunMetrics(config, methods, list(records), stats, failures, dict(skipped_items or {}))
