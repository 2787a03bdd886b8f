"""The SteerX experiment: fit every user, evaluate every method and control on held-out text,
compute the paired statistics, write the report.

Splits are fixed per item (:mod:`steerx_lens.data.splits`): vectors, attribution, descriptions,
distinctive-term masks and history prompts use each user's *fit* items only; the validation
items are left to the sweep; held-out items are only scored. Each steered method has its own
cell (layer, alpha, r; :mod:`steerx_lens.evaluation.cells`), so a run fits the population at
every layer some method uses; the per-user evidence (attribution, ŷ, minimal pairs) does not
depend on the layer and is computed once.

Results are keyed by content: :attr:`Experiment.key` hashes the configuration and cells, the
model and every user's data, and a user's record in ``DIR/users/`` is reused only when its key
matches. The fit is saved as it goes under ``DIR/cache/fit-<fit key>/`` (evidence per user,
then per layer the population and each user's vectors and directions), so an interrupted run
never fits a user twice. Items the pipeline cannot use are skipped by the rule of
:mod:`steerx_lens.screening`; a user whose evaluation fails on its data is reported and the
others finish; a run with no evaluable user is a :class:`DataError`. The output folder is held
with :func:`steerx_lens.runs.out_lock` while the run writes.

Strength chosen on validation (``alphas``): each steered method's ``alpha`` is the candidate
with the lowest mean NLL change on the users' *validation* items, ``0`` (no steering) among the
candidates, one choice per method for the whole data set (:func:`~steerx_lens.evaluation.cells.
choose_alpha`), made from the same fit before any held-out item is scored; ``metrics.json``
records every candidate's validation change (``config.strength_choice``).

Users are evaluated in groups (``users_per_batch``): the NLL rows of every user, method and
other user's vector of a group share forward batches (each row steered by its own vector; one
call per site), and the generations of every method share length-sorted batches (one per-row
steering vector each).
Rows are left-padded and masked, so a user's numbers do not depend on which users it was batched
with (up to float rounding).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens.atomic import write_bytes, write_text
from steerx_lens.attribution import AttributionConfig
from steerx_lens.backbones import shared_reads
from steerx_lens.constructions import DESCRIPTION_DRIVEN
from steerx_lens.data import DEFAULT_N_VALIDATION, HistoryItem, UserHistory, fit_split
from steerx_lens.errors import DataError, SteerXError
from steerx_lens.evaluation.cells import (
    STEERED_METHODS,
    Cell,
    check_alpha_candidates,
    choose_alpha,
    default_cells,
)
from steerx_lens.evaluation.generation import (
    GENERATION_BATCH_SIZE,
    SANITY_COMPARISON,
    generate_samples,
    generation_informative,
    generation_prompt,
    rouge_check_significant,
    scored_pairs,
)
from steerx_lens.evaluation.masks import distinct_spans, planted_spans, span_masks
from steerx_lens.evaluation.metrics import (
    ALL_METHODS,
    DESCRIPTION_SYSTEM_TEMPLATE,
    OTHER_DESCRIPTION,
    OTHER_METHODS,
    encode_for_eval,
    item_generation_scores,
    pooled_nll,
    preference_masks,
    token_nll,
)
from steerx_lens.evaluation.report import write_report
from steerx_lens.evaluation.results import (
    GENERATION_METRICS,
    NLL_METRICS,
    ItemValues,
    Metric,
    RunMetrics,
    UserRecord,
)
from steerx_lens.evaluation.stats import UserItems, adjust, compare, holm
from steerx_lens.evidence import UserEvidence
from steerx_lens.pipeline import (
    FitResult,
    Population,
    SteerX,
    SteerXConfig,
    UserSteering,
    described,
    stacked_steer,
)
from steerx_lens.runs import content_key, out_lock, user_file_names, write_name_index
from steerx_lens.screening import history_limits, screen_items
from steerx_lens.text import EncodedText, encode_item, recent_items
from steerx_lens.vectors import SteeringVector
from steerx_lens.viz import save_attribution_html

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PRIMARY = ("steerx", "baseline", "nll")
"""The one primary comparison: SteerX vs the all-history baseline of the same backbone,
all-token held-out NLL, paired over users."""
COMPARISONS = (
    ("steerx", "baseline"),
    ("steerx", "none"),
    ("baseline", "none"),
    ("shared", "none"),
    ("steerx", "shared"),
    ("baseline", "shared"),
    ("steerx", "decomposed_baseline"),
    ("steerx", "random_swap"),
    ("steerx", "description_swap"),
    ("steerx", "steerx_other"),
    ("baseline", "baseline_other"),
    ("history_prompt", "none"),
    ("description_prompt", "none"),
    ("description_prompt", "description_prompt_other"),
)
"""Every reported comparison (a, b): positive mean = a better. Holm adjusts over all of them ×
:data:`COMPARED_METRICS`."""
GOAL_FAMILY = (
    ("steerx", "baseline", "nll"),
    ("steerx", "baseline", "nll_distinct"),
    ("steerx", "baseline", "rougeL"),
    ("steerx", "none", "nll"),
    ("steerx", "decomposed_baseline", "nll"),
    ("steerx", "random_swap", "nll"),
)
"""The confirmatory family: the method's stated goal (SteerX beats the baseline of its backbone
on all tokens, distinctive tokens and ROUGE-L, is not worse than no steering, and beats the two
matched controls). Holm adjusts over these six alone (``p_holm_goal``), beside the adjustment over
every comparison (``p_holm``), which also counts the exploratory ones."""
TIE_TOLERANCE = 1e-5
"""Relative difference below which two per-item values are a tie (float32 batch rounding)."""
COMPARED_METRICS = ("nll", "nll_distinct", "nll_marker", "nll_pref", "rougeL", "bleu")
NllKey = tuple[str, str, str | None]  # (user id, method, other user's id for *_other methods)
NllRequests = dict[NllKey, tuple[list[EncodedText], list[SteeringVector | None]]]
Masks = dict[Metric, list[Bool[Tensor, " n"]]]


def _item_values(nlls: Sequence[Float[Tensor, " n"]], masks: Sequence[Tensor] | None) -> ItemValues:
    """Per item, the mean NLL over the mask's tokens (all tokens without a mask) and how many
    were counted. A mask may be shorter than its item (attribution truncates responses that do
    not fit ``max_context_tokens``): it covers the response's first tokens."""
    values: list[float | None] = []
    weights: list[int] = []
    for index, nll in enumerate(nlls):
        if masks is None:
            chosen = nll
        else:
            mask = masks[index]
            chosen = nll[: mask.numel()][mask[: nll.numel()]] if mask.numel() else nll[:0]
        count = int(chosen.numel())
        value = float(chosen.mean()) if count else None
        finite = value is not None and np.isfinite(value)
        values.append(value if finite else None)  # e.g. overflowed activations: no number
        weights.append(count if finite else 0)
    return ItemValues(values, weights)


def _average_items(per_other: Sequence[ItemValues]) -> ItemValues:
    """Per item, the mean over other users' vectors (items with no value under any: None)."""
    values: list[float | None] = []
    weights: list[int] = []
    for index in range(len(per_other[0].values)):
        found = [v.values[index] for v in per_other if v.values[index] is not None]
        values.append(float(np.mean(found)) if found else None)
        weights.append(per_other[0].weights[index] if found else 0)
    return ItemValues(values, weights)


class Experiment:
    """Fits users, scores every method on held-out items and writes ``DIR``.

    ``alphas``: candidate strengths each steered method's ``alpha`` is chosen from on the
    validation items (``steerx eval`` passes
    :data:`~steerx_lens.evaluation.cells.DEFAULT_ALPHA_CANDIDATES`); ``None`` keeps each cell's
    ``alpha``.
    """

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
        cells: Mapping[str, Cell] | None = None,
        n_validation: int = DEFAULT_N_VALIDATION,
        max_other_users: int = 5,
        alphas: Sequence[float] | None = None,
    ) -> None:
        if users_per_batch < 1:
            raise ValueError(f"users_per_batch must be >= 1, got {users_per_batch}")
        if generate and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 with generation, got {max_new_tokens}")
        self.model = model
        self.out = Path(out)
        self.pipeline = SteerX(model, config, cache_dir=self.out / "cache", progress=progress)
        base = self.pipeline.config
        assert base.layer is not None  # resolved by SteerX
        unknown = sorted(set(cells or {}) - set(STEERED_METHODS))
        if unknown:
            raise ValueError(f"cells for unknown methods {unknown}; known: {STEERED_METHODS}")
        self.cells = {**default_cells(base.layer, base.alpha, base.r), **(cells or {})}
        for cell in self.cells.values():
            self.pipeline.adapter.resolve(base.site_at(cell.layer))
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.users_per_batch = users_per_batch  # not in the config: results do not depend on it
        self.n_validation = n_validation
        if max_other_users < 1:
            raise ValueError(f"max_other_users must be >= 1, got {max_other_users}")
        self.max_other_users = max_other_users
        self.alphas = None if alphas is None else check_alpha_candidates(alphas)
        self.names = user_file_names([user.user_id for user in users])
        self.skipped_items: dict[str, list[str]] = {}
        self.skipped: dict[str, str] = {}
        self.users: list[UserHistory] = []
        self.validation: dict[str, list[HistoryItem]] = {}
        for user in users:
            fit_items, validation = fit_split(user, n_validation)
            usable = self._usable(fit_items)
            if usable.history and usable.heldout:
                self.users.append(usable)
                if validation and self.alphas is not None:
                    self.validation[user.user_id] = self._usable_validation(user, validation)
            elif user.history and user.heldout:
                self.skipped[user.user_id] = "no usable history or no usable held-out items"
            else:
                self.skipped[user.user_id] = "no history or no held-out items"
        fit_config = {k: v for k, v in asdict(base).items() if k not in ("layer", "alpha", "r")}
        self.config = {
            **asdict(base),
            "cells": {method: cell.to_json() for method, cell in self.cells.items()},
            "n_validation": n_validation,
            "max_other_users": max_other_users,
            "alpha_candidates": None if self.alphas is None else list(self.alphas),
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
        self.fit_key = content_key({"config": fit_config, "model": model_id, "users": data})
        validation = {uid: [item.to_dict() for item in v] for uid, v in self.validation.items()}
        self.key = content_key(
            {"config": self.config, "model": model_id, "users": data, "validation": validation}
        )
        self.strength_choice: dict[str, Any] | None = None
        self._fits: dict[int, FitResult] = {}
        self._evidence: dict[str, UserEvidence] = {}

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

    def _usable_validation(
        self, user: UserHistory, items: Sequence[HistoryItem]
    ) -> list[HistoryItem]:
        """The validation items the run can score (the history items' limits)."""
        limits = history_limits(self.pipeline)
        tokenizer = self.pipeline.adapter.tokenizer
        kept, skipped = screen_items(tokenizer, user.user_id, items, "validation item", limits)
        if skipped:
            self.skipped_items.setdefault(user.user_id, []).extend(skipped)
        return kept

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
            return UserRecord.from_json(record)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # missing or unreadable: computed again

    # ------------------------------------------------------------------ resumable fit
    @property
    def fit_dir(self) -> Path:
        """Where the fit is saved as it goes: ``DIR/cache/fit-<fit key>/``."""
        return self.out / "cache" / f"fit-{self.fit_key}"

    @staticmethod
    def _load_population(folder: Path) -> Population | None:
        """The population saved in ``folder`` by an earlier run with the same fit key (None
        when there is none, it cannot be read, or it predates saved baselines: it is built
        again)."""
        try:
            population = Population.load(folder)
        except (OSError, SteerXError):
            return None
        return population if population.baselines else None

    def _user_evidence(self, user: UserHistory, population: Population) -> UserEvidence:
        """The user's evidence (layer-independent): memoised, saved, loaded when saved."""
        if user.user_id in self._evidence:
            return self._evidence[user.user_id]
        path = self.fit_dir / "evidence" / f"{self.names[user.user_id]}.safetensors"
        try:
            evidence = UserEvidence.load(path)
        except SteerXError:
            evidence = self.pipeline.evidence(user, population)
            evidence.save(path)
        self._evidence[user.user_id] = evidence
        return evidence

    def _fit_user(self, user: UserHistory, population: Population, folder: Path) -> UserSteering:
        """One user's vectors at the population's site: loaded when saved, else computed and
        saved (the directions file marks them complete)."""
        evidence = self._user_evidence(user, population)
        path = folder / "users" / f"{self.names[user.user_id]}.directions.safetensors"
        baseline = population.baselines.get(user.user_id)
        if baseline is not None:
            try:
                tensors = load_file(str(path))
                weight = tensors.get("anchor_weight")
                return self.pipeline.assemble(
                    evidence,
                    population,
                    baseline,
                    tensors.get("steerx"),
                    tensors.get("random_swap"),
                    None if weight is None else float(weight),
                )
            except (SafetensorError, OSError):
                pass  # not saved yet (or unreadable): computed below
        fitted = self.pipeline.vectors(evidence, population)
        weight = fitted.anchor_weight
        directions = {
            name: tensor.contiguous()
            for name, tensor in (
                ("steerx", fitted.personal_direction),
                ("random_swap", fitted.random_direction),
                ("anchor_weight", None if weight is None else torch.tensor(weight)),
            )
            if tensor is not None
        }
        write_bytes(path, save(directions))
        return fitted

    def fit_at(self, layer: int) -> FitResult:
        """Every user's vectors at ``layer`` (resumed from :attr:`fit_dir`)."""
        if layer in self._fits:
            return self._fits[layer]
        folder = self.fit_dir / f"layer-{layer}"
        population = self._load_population(folder)
        if population is None:
            site = self.pipeline.config.site_at(layer)
            population = self.pipeline.build_population(self.users, site)
            population.save(folder)
        failures = dict(population.failures)
        fitted: dict[str, UserSteering] = {}
        for user in population.users:  # every description first (description_specific)
            try:
                self._user_evidence(user, population)
            except (SteerXError, ValueError) as error:
                failures[user.user_id] = f"{type(error).__name__}: {error}"
        population.descriptions = described(self._evidence)
        for user in tqdm(
            population.users, desc=f"users at layer {layer}", disable=not self.progress
        ):
            if user.user_id in failures:
                continue
            try:
                fitted[user.user_id] = self._fit_user(user, population, folder)
            except (SteerXError, ValueError) as error:
                failures[user.user_id] = f"{type(error).__name__}: {error}"
        fit = FitResult(population, fitted, failures, dict(self._evidence))
        for user_id in fitted:
            self._description_swap(fit, user_id, folder)
        self._fits[layer] = fit
        return fit

    def _description_swap(self, fit: FitResult, user_id: str, folder: Path) -> None:
        """Set the user's ``description_swap`` direction (needs every user's description, so
        after all are fitted): loaded when saved, else computed and saved."""
        path = folder / "users" / f"{self.names[user_id]}.description_swap.safetensors"
        try:
            direction = load_file(str(path)).get("direction")
        except (SafetensorError, OSError):
            direction = self.pipeline.description_swap_direction(fit, user_id)
            tensors = {} if direction is None else {"direction": direction.contiguous()}
            write_bytes(path, save(tensors))
        fit.users[user_id].description_swap_direction = direction

    def fit(self) -> dict[str, FitResult]:
        """The fits at every layer some method's cell uses (each text's activations at all of
        them read in one pass, :func:`~steerx_lens.backbones.shared_reads`)."""
        layers = sorted({c.layer for c in self.cells.values()})
        with shared_reads(self.model, [self.pipeline.config.site_at(layer) for layer in layers]):
            return {layer: self.fit_at(layer) for layer in layers}

    def prompt_history(self, user: UserHistory) -> list[HistoryItem]:
        """The most recent fit items whose block fits half of ``max_context_tokens``."""
        budget = self.pipeline.config.max_context_tokens // 2
        return recent_items(self.pipeline.adapter.tokenizer, user.history, budget)

    # ------------------------------------------------------------------ strength
    @property
    def strength_file(self) -> Path:
        """Where the strength choice is saved: ``DIR/cache/strength-<key>.json``."""
        return self.out / "cache" / f"strength-{self.key}.json"

    def choose_strengths(self) -> dict[str, Any]:
        """Each steered method's ``alpha`` among :attr:`alphas`, chosen on the validation items
        (mean over users of the token-mean NLL change against no steering), applied to
        :attr:`cells`; loaded when an earlier run with the same key saved it."""
        assert self.alphas is not None
        choice = self._saved_strengths()
        if choice is None:
            choice = self._score_strengths(self.fit())  # memoised / loaded from the cache
            write_text(self.strength_file, json.dumps(choice, indent=1))
        for method, entry in choice["methods"].items():
            self.cells[method] = replace(self.cells[method], alpha=float(entry["alpha"]))
        self.strength_choice = choice
        return choice

    def _saved_strengths(self) -> dict[str, Any] | None:
        """The choice an earlier run saved, or None when there is none or it is unreadable or
        malformed (then it is computed again)."""
        assert self.alphas is not None
        try:
            choice = json.loads(self.strength_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        methods = choice.get("methods") if isinstance(choice, dict) else None
        if not isinstance(methods, dict) or not set(methods) <= set(STEERED_METHODS):
            return None
        if not all(isinstance(e, dict) and e.get("alpha") in self.alphas for e in methods.values()):
            return None
        return choice

    def _score_strengths(self, fits: Mapping[int, FitResult]) -> dict[str, Any]:
        """Validation NLL change of every method at every candidate strength (one batched
        :func:`token_nll` call per site) and each method's choice."""
        assert self.alphas is not None
        tokenizer = self.pipeline.adapter.tokenizer
        users = [
            uid
            for uid in sorted(self.validation)
            if self.validation[uid] and all(uid in fit.users for fit in fits.values())
        ]
        requests: NllRequests = {}
        for uid in users:
            texts = [encode_for_eval(tokenizer, item) for item in self.validation[uid]]
            requests[uid, "none", None] = (texts, [None] * len(texts))
            for method in STEERED_METHODS:
                cell = self.cells[method]
                for alpha in self.alphas:
                    if alpha == 0:
                        continue
                    vector = self.pipeline.method_vector(
                        fits[cell.layer], uid, method, alpha, cell.r
                    )
                    requests[uid, method, f"{alpha:g}"] = (texts, [vector] * len(texts))
        nlls = self._batched_nll(requests)

        def mean_change(method: str, alpha: float) -> float:
            """Mean over users of NLL(method at alpha) − NLL(none); 0 at alpha = 0."""
            if alpha == 0:
                return 0.0
            label = f"{alpha:g}"
            per_user = [
                pooled_nll(nlls[uid, method, label]) - pooled_nll(nlls[uid, "none", None])
                for uid in users
            ]
            return float(np.mean(per_user))

        methods: dict[str, dict[str, Any]] = {}
        for method in STEERED_METHODS if users else ():  # no validation items: cells kept
            changes = {alpha: mean_change(method, alpha) for alpha in self.alphas}
            methods[method] = {
                "alpha": choose_alpha(changes),
                "candidates": list(changes),
                "validation_nll_change": list(changes.values()),
            }
        return {"n_users": len(users), "methods": methods}

    # ------------------------------------------------------------------ methods' vectors
    def method_vector(
        self, user_id: str, method: str, fits: Mapping[int, FitResult]
    ) -> SteeringVector:
        """The vector ``method`` adds for ``user_id`` at its cell (alpha included)."""
        cell = self.cells[method]
        return self.pipeline.method_vector(fits[cell.layer], user_id, method, cell.alpha, cell.r)

    def _steering_norm(self, vector: SteeringVector, fits: Mapping[int, FitResult]) -> float:
        """``‖alpha·v‖ / ‖h‖`` at the vector's layer."""
        norm = fits[vector.layer].population.residual_norm if vector.layer is not None else 0.0
        return abs(vector.alpha) * vector.norm() / norm if norm else float("nan")

    def other_users(self, user_id: str, candidates: Sequence[str]) -> list[str]:
        """The other users whose vectors the ``*_other`` NLL controls average over: all of them,
        or ``max_other_users`` drawn per user (seeded by the seed and the user's id)."""
        others = sorted(uid for uid in candidates if uid != user_id)
        if len(others) <= self.max_other_users:
            return others
        rng = random.Random(f"{self.pipeline.config.seed}:{user_id}:others")
        return sorted(rng.sample(others, self.max_other_users))

    def _other_user(self, user_id: str, candidates: Sequence[str]) -> str:
        """The one other user whose vectors the ``*_other`` generation controls use (seeded
        by the seed and the user's id)."""
        others = sorted(uid for uid in candidates if uid != user_id)
        return random.Random(f"{self.pipeline.config.seed}:{user_id}:other").choice(others)

    # ------------------------------------------------------------------ NLL
    def _nll_requests(
        self,
        users: Sequence[UserHistory],
        fits: Mapping[int, FitResult],
        histories: Mapping[str, list[HistoryItem]],
        fitted_ids: Sequence[str],
    ) -> NllRequests:
        """Every (user, method, other user) NLL evaluation: its texts and one vector per text."""
        tokenizer = self.pipeline.adapter.tokenizer
        requests: NllRequests = {}
        for user in users:
            uid, n = user.user_id, len(user.heldout)
            plain = [encode_for_eval(tokenizer, item) for item in user.heldout]
            requests[uid, "none", None] = (plain, [None] * n)
            for method in STEERED_METHODS:
                requests[uid, method, None] = (plain, [self.method_vector(uid, method, fits)] * n)
            prompted = [encode_for_eval(tokenizer, item, histories[uid]) for item in user.heldout]
            requests[uid, "history_prompt", None] = (prompted, [None] * n)
            description = self._description(uid, fits)
            if description:
                system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
                described = [encode_item(tokenizer, item, (), system) for item in user.heldout]
                requests[uid, "description_prompt", None] = (described, [None] * n)
            for other_id in self.other_users(uid, fitted_ids):
                other_description = self._description(other_id, fits)
                if other_description:
                    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=other_description)
                    described = [encode_item(tokenizer, item, (), system) for item in user.heldout]
                    requests[uid, OTHER_DESCRIPTION, other_id] = (described, [None] * n)
            for control, mode in OTHER_METHODS.items():
                for other_id in self.other_users(uid, fitted_ids):
                    vector = self.method_vector(other_id, mode, fits)
                    requests[uid, control, other_id] = (plain, [vector] * n)
        return requests

    def _description(self, user_id: str, fits: Mapping[int, FitResult]) -> str | None:
        fit = next(iter(fits.values()))
        return fit.users[user_id].description if user_id in fit.users else None

    def _batched_nll(
        self, requests: NllRequests
    ) -> dict[NllKey, list[Float[Tensor, " n_response"]]]:
        """All requests' per-token NLLs: one :func:`token_nll` call per site (rows of every
        user and method share forward batches, each row steered by its own vector)."""
        keys_of = list(requests)
        sites = [next((v.site for v in requests[k][1] if v is not None), None) for k in keys_of]
        result: dict[NllKey, list[Tensor]] = {}
        for group in _site_groups(sites):
            keys = [keys_of[i] for i in group]
            texts = [text for key in keys for text in requests[key][0]]
            vectors = [vector for key in keys for vector in requests[key][1]]
            values = iter(
                token_nll(self.model, texts, vectors, batch_size=self.pipeline.config.batch_size)
            )
            for key in keys:
                result[key] = [next(values) for _ in requests[key][0]]
        return result

    def _masks(
        self,
        user: UserHistory,
        texts: Sequence[EncodedText],
        population: Population,
        spans: Mapping[str, Any],
    ) -> Masks:
        """Per metric, the held-out tokens it counts (:mod:`steerx_lens.evaluation.masks`);
        ``texts`` are the user's held-out items encoded without history."""
        tokenizer = self.pipeline.adapter.tokenizer
        config = self.pipeline.config
        masks: Masks = {
            "nll_distinct": span_masks(tokenizer, texts, user, spans[user.user_id]),
            "nll_pref": preference_masks(
                self.model,
                user,
                population.users,
                config=AttributionConfig(
                    k_counterfactual=config.k_counterfactual,
                    max_context_tokens=config.max_context_tokens,
                    batch_size=config.batch_size,
                    seed=config.seed,
                ),
            ),
        }
        planted = planted_spans(user)
        if planted is not None:
            masks["nll_marker"] = span_masks(tokenizer, texts, user, planted)
        return masks

    # ------------------------------------------------------------------ generation
    def _generation_texts(
        self,
        users: Sequence[UserHistory],
        fits: Mapping[int, FitResult],
        histories: Mapping[str, list[HistoryItem]],
        fitted_ids: Sequence[str],
    ) -> dict[str, dict[str, list[str]]]:
        """Per user and method, greedy continuations of the held-out task prompts
        (:mod:`steerx_lens.evaluation.generation`), every method's rows in shared batches."""
        tokenizer = self.pipeline.adapter.tokenizer
        rows: list[tuple[str, str]] = []  # (user, method) of each prompt, item by item
        prompts: list[str] = []
        vectors: list[SteeringVector | None] = []
        for method in ALL_METHODS:
            for user in users:
                uid, source = user.user_id, user.meta.get("source")
                history: list[HistoryItem] | None = None
                system, vector = None, None
                if method == "history_prompt":
                    history = histories[uid]
                elif method == "description_prompt":
                    description = self._description(uid, fits)
                    if not description:
                        continue
                    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
                elif method == OTHER_DESCRIPTION:
                    description = self._description(self._other_user(uid, fitted_ids), fits)
                    if not description:
                        continue
                    system = DESCRIPTION_SYSTEM_TEMPLATE.format(description=description)
                elif method in OTHER_METHODS:
                    other = self._other_user(uid, fitted_ids)
                    vector = self.method_vector(other, OTHER_METHODS[method], fits)
                elif method != "none":
                    vector = self.method_vector(uid, method, fits)
                for item in user.heldout:
                    rows.append((uid, method))
                    prompts.append(generation_prompt(tokenizer, item, source, history, system))
                    vectors.append(vector)
        texts: dict[str, dict[str, list[str]]] = {user.user_id: {} for user in users}
        for (uid, method), text in zip(rows, self._generate(prompts, vectors), strict=True):
            texts[uid].setdefault(method, []).append(text)
        return texts

    def _generate(
        self, prompts: Sequence[str], vectors: Sequence[SteeringVector | None]
    ) -> list[str]:
        """Greedy texts of ``prompts``, row ``i`` steered by ``vectors[i]`` (None: not steered).

        Rows of one site (unsteered rows join the first) are decoded together in length-sorted
        batches of :data:`GENERATION_BATCH_SIZE` with one per-row :class:`hooks.Steer`: a
        decoding step of many rows costs little more than one of few on CPU, so batching every
        method's rows is about twice as fast as one generation per method.
        """
        tokenizer = self.pipeline.adapter.tokenizer
        lengths = [len(tokenizer(prompt, add_special_tokens=False).input_ids) for prompt in prompts]
        out: list[str] = [""] * len(prompts)
        for indices in _site_groups([None if v is None else v.site for v in vectors]):
            ordered = sorted(indices, key=lambda i: (lengths[i], i))
            for start in range(0, len(ordered), GENERATION_BATCH_SIZE):
                chunk = ordered[start : start + GENERATION_BATCH_SIZE]
                steered = [vectors[i] for i in chunk if vectors[i] is not None]
                interventions = []
                if steered:
                    zero = replace(steered[0], vector=torch.zeros_like(steered[0].vector))
                    row_vectors = [vectors[i] or zero for i in chunk]
                    interventions.append(stacked_steer(row_vectors))
                texts = generate_samples(
                    self.model,
                    [prompts[i] for i in chunk],
                    *interventions,
                    max_new_tokens=self.max_new_tokens,
                )[0]
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate_users(
        self,
        users: Sequence[UserHistory],
        fits: Mapping[int, FitResult],
        spans: Mapping[str, Any],
    ) -> dict[str, UserRecord]:
        """Every method's per-item values on the users' held-out items, one record per user."""
        first = fits[min(fits)]
        fitted_ids = [uid for uid in first.users if all(uid in f.users for f in fits.values())]
        histories = {user.user_id: self.prompt_history(user) for user in users}
        requests = self._nll_requests(users, fits, histories, fitted_ids)
        nlls = self._batched_nll(requests)
        generations = (
            self._generation_texts(users, fits, histories, fitted_ids) if self.generate else {}
        )
        records: dict[str, UserRecord] = {}
        for user in users:
            uid = user.user_id
            plain = requests[uid, "none", None][0]
            masks = self._masks(user, plain, first.population, spans)
            items: dict[str, dict[Metric, ItemValues]] = {}
            methods = [
                m
                for m in ALL_METHODS
                if (uid, m, None) in nlls or m in OTHER_METHODS or m == OTHER_DESCRIPTION
            ]
            for method in methods:
                if method in OTHER_METHODS or method == OTHER_DESCRIPTION:
                    others = [
                        o for o in self.other_users(uid, fitted_ids) if (uid, method, o) in nlls
                    ]
                    if not others:
                        continue
                    per_metric = {
                        metric: _average_items(
                            [_item_values(nlls[uid, method, o], masks.get(metric)) for o in others]
                        )
                        for metric in ("nll", *masks)
                    }
                else:
                    values = nlls[uid, method, None]
                    per_metric = {
                        metric: _item_values(values, masks.get(metric))
                        for metric in ("nll", *masks)
                    }
                if self.generate and method in generations[uid]:
                    predictions, references = scored_pairs(
                        user.heldout, generations[uid][method], user.meta.get("source")
                    )
                    for metric, values in item_generation_scores(predictions, references).items():
                        per_metric[metric] = ItemValues(list(values), [1] * len(values))
                items[method] = per_metric
            mine = first.users[uid]
            norms = {
                m: self._steering_norm(self.method_vector(uid, m, fits), fits)
                for m in STEERED_METHODS
            }
            records[uid] = UserRecord(
                user_id=uid,
                config_key=self.key,
                n_heldout_tokens=sum(len(v) for v in nlls[uid, "none", None]),
                mask_tokens={m: int(sum(int(x.sum()) for x in masks[m])) for m in masks},
                description=mine.description,
                top_spans=mine.attribution.spans[:8],
                n_swapped_tokens=mine.n_swapped_tokens,
                steerx_fallback=mine.personal_direction is None,
                items=items,
                steering_norm=norms,
                generations=generations[uid] if self.generate else None,
            )
            save_attribution_html(
                mine.attribution, self.out / "attribution" / f"{self.names[uid]}.html"
            )
        return records

    def _evaluate_isolated(
        self,
        users: Sequence[UserHistory],
        fits: Mapping[int, FitResult],
        spans: Mapping[str, Any],
        failures: dict[str, str],
    ) -> dict[str, UserRecord]:
        """:meth:`evaluate_users`; if a user's data makes it fail, each user alone, the ones
        that fail listed in ``failures``."""
        try:
            return self.evaluate_users(users, fits, spans)
        except ValueError as error:
            if len(users) == 1:
                failures[users[0].user_id] = f"{type(error).__name__}: {error}"
                return {}
        records: dict[str, UserRecord] = {}
        for user in users:
            records.update(self._evaluate_isolated([user], fits, spans, failures))
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
            if self.alphas is not None:
                self.choose_strengths()
            if todo:
                fits = self.fit()
                for fit in fits.values():
                    failures.update(fit.failures)
                fitted = [u for u in todo if all(u.user_id in f.users for f in fits.values())]
                spans = distinct_spans(self.users)  # fit histories only, fixed before scoring
                write_name_index(self.out, self.names)
                size = self.users_per_batch
                bar = tqdm(total=len(fitted), desc="evaluating users", disable=not self.progress)
                with bar:
                    for start in range(0, len(fitted), size):
                        chunk = fitted[start : start + size]
                        group = self._evaluate_isolated(chunk, fits, spans, failures)
                        for user_id, record in group.items():
                            write_text(
                                self.user_file(user_id), json.dumps(record.to_json(), indent=1)
                            )
                        records.update(group)
                        bar.update(len(chunk))
            evaluated = [records[u.user_id] for u in self.users if u.user_id in records]
            if not evaluated:
                reasons = "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:5])
                raise DataError(f"no user could be evaluated ({reasons})")
            config = {
                **self.config,
                "cells": {method: cell.to_json() for method, cell in self.cells.items()},
                **({"strength_choice": self.strength_choice} if self.strength_choice else {}),
            }
            metrics = aggregate(evaluated, config, failures, self.skipped_items)
            write_text(self.out / METRICS_FILE, json.dumps(metrics.to_json(), indent=2))
            note = (
                f"{reused} of {len(evaluated)} users reused from an earlier run with the same "
                "data, model and configuration; the others computed in this run."
            )
            write_report(metrics, self.out, self.names, [note])
        return metrics


def _site_groups(sites: Sequence[str | None]) -> list[list[int]]:
    """Row indices grouped by steering site (one call per site); unsteered rows (``None``)
    join the first steered group, or form the only one."""
    groups: dict[str | None, list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault(site, []).append(i)
    if None in groups and len(groups) > 1:
        unsteered = groups.pop(None)
        first = next(iter(groups))
        groups[first] = unsteered + groups[first]
    return list(groups.values())


def _difference(x: float, y: float) -> float:
    """``y − x``, 0 within float32 rounding (:data:`TIE_TOLERANCE` relative): two methods that
    add the same vector differ only by the rounding of their batch shapes, which is a tie, not
    evidence for either."""
    difference = y - x
    return 0.0 if abs(difference) <= TIE_TOLERANCE * max(abs(x), abs(y)) else difference


def paired_users(records: Sequence[UserRecord], a: str, b: str, metric: Metric) -> list[UserItems]:
    """Per user with both methods, the per-item differences (positive = ``a`` better; ties
    within float32 rounding are 0) and weights (``a``'s token counts) over the items where
    both have a value."""
    sign = 1.0 if metric in NLL_METRICS else -1.0
    users = []
    for record in records:
        first, second = record.items.get(a, {}).get(metric), record.items.get(b, {}).get(metric)
        if first is None or second is None:
            continue
        pairs = [
            (sign * _difference(x, y), w)
            for x, y, w in zip(first.values, second.values, first.weights, strict=True)
            if x is not None and y is not None and w > 0
        ]
        if pairs:
            users.append(
                UserItems(np.array([d for d, _ in pairs]), np.array([w for _, w in pairs]))
            )
    return users


def confirmatory(comparisons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The comparisons of :data:`GOAL_FAMILY` present in ``comparisons`` (dicts as in
    ``metrics.json``), in the family's order, each with ``p_holm_goal``: Holm over the family."""
    by_key = {(c["a"], c["b"], c["metric"]): c for c in comparisons}
    present = [by_key[key] for key in GOAL_FAMILY if key in by_key]
    adjusted = holm({str(i): c["wilcoxon_p"] for i, c in enumerate(present)})
    return [{**c, "p_holm_goal": adjusted[str(i)]} for i, c in enumerate(present)]


def aggregate(
    records: Sequence[UserRecord],
    config: dict[str, Any],
    failures: dict[str, str],
    skipped_items: dict[str, list[str]] | None = None,
    n_boot: int = 2000,
) -> RunMetrics:
    """Means over users per method, every comparison of :data:`COMPARISONS` with its two-level
    bootstrap CI, Wilcoxon p and Holm-adjusted p over the whole family, and the generation
    sanity check."""
    seed = int(config.get("seed", 0))
    methods: dict[str, dict[Metric, float | None]] = {}
    for method in ALL_METHODS:
        present = [r.scores[method] for r in records if method in r.items]
        if not present:
            continue
        metrics = [m for m in (*NLL_METRICS, *GENERATION_METRICS) if any(m in p for p in present)]
        summary: dict[str, Any] = {}
        for metric in metrics:
            values = [p[metric] for p in present if p.get(metric) is not None]
            summary[metric] = float(np.mean(values)) if values else None
            summary[f"n_users_{metric}"] = len(values)
        norms = [r.steering_norm[method] for r in records if method in r.steering_norm]
        if norms:
            summary["steering_norm"] = float(np.mean(norms))
        methods[method] = summary
    comparisons = []
    for a, b in COMPARISONS:
        if b == "description_swap" and config.get("construction") not in DESCRIPTION_DRIVEN:
            continue  # the construction does not read the description: the same vector
        for metric in COMPARED_METRICS:
            users = paired_users(records, a, b, metric)
            if users:
                comparisons.append(compare(a, b, metric, users, n_boot=n_boot, seed=seed))
    rows = [c.as_dict() for c in adjust(comparisons)]
    by_key = {(row["a"], row["b"], row["metric"]): row for row in rows}
    primary = None
    if PRIMARY in by_key:
        primary = {k: v for k, v in by_key[PRIMARY].items() if k != "n_positive"}
    check = None
    if "history_prompt" in methods and "rougeL" in methods["history_prompt"]:
        paired = None
        if SANITY_COMPARISON in by_key:
            sanity = by_key[SANITY_COMPARISON]
            paired = {k: sanity[k] for k in ("mean", "n_positive", "n_users", "wilcoxon_p")}
        ok, message = generation_informative(
            {m: methods[m].get("rougeL") for m in ("none", "history_prompt")},
            config.get("data"),
            paired,
        )
        check = {"informative": ok, "message": message, "paired": paired}
        if paired is not None:
            check["significant"] = rouge_check_significant(paired)
    return RunMetrics(
        config,
        methods,
        list(records),
        rows,
        primary,
        check,
        failures,
        dict(skipped_items or {}),
        confirmatory(rows),
    )
