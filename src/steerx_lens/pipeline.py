"""The SteerX pipeline: user → attribution → description → vectors (SteerX and baseline).

For every user two vectors of the chosen backbone are built at one site, so they can always be
compared:

- ``baseline`` (classic all-history steering): the backbone applied to the whole history,
  chosen = the user's texts, rejected = the model's own answers ŷ (or a neutral text).
- ``steerx`` (purified): the population's *shared* vector (the mean of all users' baseline
  vectors: the preference-agnostic "write like this dataset" direction) plus the user's
  **counterfactual minimal-pair** component: in each history item, tokens with patch-CE above
  ``swap_threshold`` nats are replaced by the model's top-1 prediction under other users'
  context (teacher-forced, token count kept), and the component contrasts the user's text with
  that swapped twin. Only the preference-driven tokens differ inside a pair, so only the
  preference-driven signal enters. Scaled so that ``alpha · vector = alpha · v_shared +
  r · ‖h‖ · v̂_mp`` (``‖h‖`` = median residual norm at the site). Users with no token above
  the threshold fall back to the shared vector (``extra["fallback"]``).

This construction is a reconstruction (the paper's body was not available); it is the one that
beat the shared vector in the feasibility study (DESIGN.md §1), see ``docs/method.md``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.atomic import write_text
from steerx_lens.attribution import (
    DEFAULT_K_COUNTERFACTUAL,
    DEFAULT_MAX_CONTEXT_TOKENS,
    TokenEffects,
    UserAttribution,
    attribute_user,
    encode_item,
)
from steerx_lens.backbones.mean_diff import (
    EncodedText,
    Pool,
    mean_diff_vector,
    minimal_pair_vector,
    model_answers,
    residual_norm,
)
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory, build_prompt, read_users, save_users
from steerx_lens.describe import LLMDescriber, TemplateDescriber, describe
from steerx_lens.errors import SteerXError
from steerx_lens.vectors import SteeringVector

Backbone = Literal["mean_diff", "bipo", "sae"]
DEFAULT_DEPTH_FRACTION = 0.4
NEUTRAL_ANSWER = "Thank you for your question. Here is a general answer that covers the basics."


@dataclass(frozen=True)
class SteerXConfig:
    """Every documented default of the pipeline (see the module docstring)."""

    layer: int | None = None
    site_kind: str = "hook_resid_post"
    backbone: Backbone = "mean_diff"
    pool: Pool = "response_mean"
    negatives: Literal["model", "neutral"] = "model"
    answer_tokens: int = 48
    alpha: float = 1.0
    swap_threshold: float = 2.0
    r: float = 0.15
    k_counterfactual: int = DEFAULT_K_COUNTERFACTUAL
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS
    batch_size: int = 8
    describer: Literal["template", "llm"] = "template"
    sae_k: int = 32
    bipo_steps: int = 40
    seed: int = 0

    @property
    def site(self) -> str:
        """The canonical site name ``blocks.{layer}.{site_kind}``."""
        if self.layer is None:
            raise SteerXError("no layer chosen: call for_model(n_layers) or set layer=")
        return f"blocks.{self.layer}.{self.site_kind}"

    def for_model(self, n_layers: int) -> SteerXConfig:
        """This config with ``layer=None`` resolved to 40% of the model's depth.

        40% gives layer 12 of SmolLM2-135M's 30, the default validated in docs/method.md; the
        layer is always taken from the model, never assumed.
        """
        if self.layer is not None:
            return self
        return replace(self, layer=round(DEFAULT_DEPTH_FRACTION * n_layers))


@dataclass
class UserSteering:
    """One user's SteerX result: attribution, description and the two vectors."""

    user_id: str
    attribution: UserAttribution
    baseline: SteeringVector
    steerx: SteeringVector
    n_swapped_tokens: int
    personal_direction: Tensor | None = None

    def steerx_at(
        self, shared: SteeringVector, alpha: float, r: float, norm: float
    ) -> SteeringVector:
        """The SteerX vector for another ``alpha`` / ``r``: ``alpha·shared + r·‖h‖·v̂_mp``."""
        personal = (
            torch.zeros_like(shared.vector)
            if self.personal_direction is None
            else self.personal_direction
        )
        vector = shared.vector + (r * norm / alpha) * personal
        return replace(self.steerx, vector=vector, alpha=alpha, extra={**self.steerx.extra, "r": r})

    @property
    def description(self) -> str | None:
        """The user's natural-language preference description (stage 3)."""
        return self.attribution.description


@dataclass
class Population:
    """What SteerX needs from other users: their histories (counterfactual contexts), the
    shared vector and the residual-norm scale. Saved as ``users.jsonl`` + ``shared.safetensors``
    + ``population.json``."""

    users: list[UserHistory]
    shared: SteeringVector
    residual_norm: float
    baselines: dict[str, SteeringVector] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write ``users.jsonl``, ``shared.safetensors`` and ``population.json`` into ``folder``."""
        folder = Path(folder)
        save_users(self.users, folder / "users.jsonl")
        self.shared.save(folder / "shared.safetensors")
        write_text(folder / "population.json", json.dumps({"residual_norm": self.residual_norm}))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: Any = None) -> Population:
        """Read a folder written by :meth:`save`; with ``model``, check the shared vector's model."""
        folder = Path(folder)
        if not (folder / "population.json").exists():
            raise SteerXError(f"{folder} holds no saved population (population.json missing)")
        meta = json.loads((folder / "population.json").read_text())
        shared = SteeringVector.load(folder / "shared.safetensors", model=model)
        return cls(read_users(folder / "users.jsonl"), shared, float(meta["residual_norm"]))


@dataclass
class FitResult:
    """:meth:`SteerX.fit_many` output: per-user results and the users that failed (why)."""

    population: Population
    users: dict[str, UserSteering]
    failures: dict[str, str]


class SteerX:
    """Fit SteerX and baseline vectors for users of one model at one site."""

    def __init__(
        self,
        model: Any,
        config: SteerXConfig | None = None,
        cache_dir: str | Path | None = None,
        sae: Any = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.config = (config or SteerXConfig()).for_model(self.adapter.n_layers)
        limit = self.adapter.max_positions
        if limit is not None and self.config.max_context_tokens > limit:
            raise SteerXError(
                f"max_context_tokens={self.config.max_context_tokens} exceeds the model's "
                f"context of {limit} tokens; set SteerXConfig(max_context_tokens<={limit})"
            )
        self.adapter.resolve(self.config.site)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.sae = sae
        self.progress = progress
        self._answers: dict[str, str] = {}
        self._attributions: dict[tuple[str, tuple[str, ...]], UserAttribution] = {}

    # ------------------------------------------------------------------ sequences
    def encode(self, item: HistoryItem) -> EncodedText:
        """Plain prompt (no history) ⊕ the item's output."""
        ids, _, _, response_start = encode_item(self.adapter.tokenizer, item, [])
        return EncodedText(ids, response_start)

    def model_answers(self, items: Sequence[HistoryItem]) -> list[str]:
        """The model's own greedy answers ŷ to the items' prompts (memoised and disk-cached)."""
        missing = [item.input for item in items if item.input not in self._answers]
        if missing:
            prompts = [
                build_prompt(self.adapter.tokenizer, text) for text in dict.fromkeys(missing)
            ]
            answers = model_answers(
                self.model,
                prompts,
                self.config.answer_tokens,
                self.config.batch_size,
                self.cache_dir,
                self.progress,
            )
            self._answers.update(zip(dict.fromkeys(missing), answers, strict=True))
        return [self._answers[item.input] for item in items]

    def negatives(self, items: Sequence[HistoryItem]) -> list[HistoryItem]:
        """ŷ (``negatives="model"``) or a neutral answer for each item's prompt."""
        if self.config.negatives == "neutral":
            return [HistoryItem(item.input, NEUTRAL_ANSWER) for item in items]
        return [
            HistoryItem(item.input, y)
            for item, y in zip(items, self.model_answers(items), strict=True)
        ]

    # ------------------------------------------------------------------ vectors
    def _vector(self, raw: Tensor, mode: str, user_id: str | None, **extra: Any) -> SteeringVector:
        return SteeringVector(
            raw.detach().float().cpu(),
            self.config.site,
            self.adapter.fingerprint(),
            backbone=self.config.backbone,
            mode=mode,  # type: ignore[arg-type]
            alpha=self.config.alpha,
            user_id=user_id,
            extra=dict(extra),
        )

    def contrast(
        self, chosen: Sequence[HistoryItem], rejected: Sequence[HistoryItem]
    ) -> Float[Tensor, " d_model"]:
        """The backbone's vector for chosen vs rejected texts of the same prompts.

        In SteerX mode ``rejected`` are the minimal-pair twins, so for BiPO the preference
        margin is carried only by the swapped (preference-driven) tokens.
        """
        backbone = self.config.backbone
        if backbone == "bipo":
            from steerx_lens.backbones.bipo import BiPOConfig, PreferencePair, train_bipo

            pairs = [
                PreferencePair(
                    build_prompt(self.adapter.tokenizer, good.input), good.output, bad.output
                )
                for good, bad in zip(chosen, rejected, strict=True)
            ]
            config = BiPOConfig(steps=self.config.bipo_steps, seed=self.config.seed)
            return train_bipo(self.model, self.config.site, pairs, config, progress=False).vector
        vector = mean_diff_vector(
            self.model,
            self.config.site,
            [self.encode(item) for item in chosen],
            [self.encode(item) for item in rejected],
            self.config.pool,
            self.config.batch_size,
        )
        if backbone == "sae":
            from steerx_lens.backbones.sae import project_vector

            return project_vector(vector, self._sae(), k=self.config.sae_k).vector
        return vector

    def _sae(self) -> Any:
        """The SAE for ``backbone="sae"``: the one given, or the cached demo SAE at this site."""
        from steerx_lens.backbones.sae import check_sae_fits, train_demo_sae

        if self.sae is None:
            self.sae = train_demo_sae(self.config.layer, site=self.config.site)
        check_sae_fits(self.sae, self.model, self.config.site)
        return self.sae

    def baseline_vector(self, user: UserHistory) -> SteeringVector:
        """Classic all-history steering: user's texts vs the negatives, every history item."""
        if not user.history:
            raise SteerXError(f"user {user.user_id!r} has an empty history: nothing to fit")
        raw = self.contrast(user.history, self.negatives(user.history))
        return self._vector(raw, "baseline", user.user_id)

    def build_population(self, users: Sequence[UserHistory]) -> Population:
        """Baseline vectors of ``users`` → their mean (the shared vector) and the norm scale."""
        usable = [user for user in users if user.history]
        if len(usable) < 2:
            raise SteerXError(
                "SteerX needs a population of at least 2 users with histories (other users' "
                "contexts are the counterfactuals and their mean vector is the shared part)"
            )
        baselines = {}
        for user in tqdm(usable, desc="baseline vectors", disable=not self.progress):
            baselines[user.user_id] = self.baseline_vector(user)
        shared = torch.stack([v.vector for v in baselines.values()]).mean(0)
        texts = [self.encode(item) for user in usable for item in user.history[:4]]
        norm = residual_norm(self.model, self.config.site, texts, self.config.batch_size)
        return Population(
            list(usable),
            self._vector(shared, "shared", None, n_users=len(baselines)),
            norm,
            baselines,
        )

    def minimal_pairs(
        self, user: UserHistory, effects: Sequence[TokenEffects]
    ) -> tuple[list[HistoryItem], list[HistoryItem], list[EncodedText], list[EncodedText], int]:
        """Each item's text and its swapped twin (preference-driven tokens replaced)."""
        tokenizer = self.adapter.tokenizer
        originals, twins, encoded, encoded_twins, n_swapped = [], [], [], [], 0
        for item_effects in effects:
            item = user.history[item_effects.item_index]
            original = self.encode(item)
            response = original.input_ids[original.response_start :]
            if (
                item_effects.counterfactual_top is None
                or response != item_effects.token_ids.tolist()
            ):
                warnings.warn(
                    f"user {user.user_id!r} item {item_effects.item_index}: response tokens differ "
                    "between the attribution and the plain prompt; item skipped",
                    stacklevel=2,
                )
                continue
            swap = item_effects.effects > self.config.swap_threshold
            swap &= item_effects.counterfactual_top != item_effects.token_ids
            if not bool(swap.any()):
                continue
            swapped = torch.where(swap, item_effects.counterfactual_top, item_effects.token_ids)
            n_swapped += int(swap.sum())
            twin_text = tokenizer.decode(swapped.tolist())
            originals.append(item)
            twins.append(HistoryItem(item.input, twin_text))
            encoded.append(original)
            encoded_twins.append(original.with_response(swapped.tolist()))
        return originals, twins, encoded, encoded_twins, n_swapped

    def steerx_vector(
        self, user: UserHistory, attribution: UserAttribution, population: Population
    ) -> tuple[SteeringVector, int, Tensor | None]:
        """Shared vector + the user's scaled minimal-pair component (see the module docstring).

        Returns the vector, the number of swapped tokens and the unit personal direction.
        """
        originals, twins, encoded, encoded_twins, n_swapped = self.minimal_pairs(
            user, attribution.items
        )
        shared = population.shared.vector
        if not encoded:
            vector = self._vector(shared, "steerx", user.user_id, fallback=True, r=self.config.r)
            return vector, 0, None
        if self.config.backbone == "mean_diff":
            component = minimal_pair_vector(
                self.model,
                self.config.site,
                encoded,
                encoded_twins,
                self.config.pool,
                self.config.batch_size,
            )
        else:
            component = self.contrast(originals, twins)
        direction = component / component.norm()
        raw = shared + (self.config.r * population.residual_norm / self.config.alpha) * direction
        vector = self._vector(
            raw,
            "steerx",
            user.user_id,
            fallback=False,
            r=self.config.r,
            n_pairs=len(encoded),
            n_swapped_tokens=n_swapped,
        )
        return vector, n_swapped, direction.detach().float().cpu()

    # ------------------------------------------------------------------ users
    def attribute(self, user: UserHistory, population: Population) -> UserAttribution:
        """Stage 1-3 for one user (memoised per user: attribution does not depend on the layer)."""
        key = (user.user_id, tuple(item.output for item in user.history))
        if key in self._attributions:
            return self._attributions[key]
        attribution = attribute_user(
            self.model,
            user,
            population.users,
            k_counterfactual=self.config.k_counterfactual,
            max_context_tokens=self.config.max_context_tokens,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
        )
        describer = (
            LLMDescriber(self.model) if self.config.describer == "llm" else TemplateDescriber()
        )
        self._attributions[key] = describe(attribution, describer)
        return self._attributions[key]

    def fit(self, user: UserHistory, population: Population | None = None) -> UserSteering:
        """Attribution, description, baseline and SteerX vectors of one user."""
        if population is None:
            raise SteerXError(
                "SteerX.fit needs a reference population (other users' histories and the shared "
                "vector): build one with SteerX.build_population(users) or Population.load(dir), "
                "or call fit_many(users)"
            )
        attribution = self.attribute(user, population)
        baseline = population.baselines.get(user.user_id) or self.baseline_vector(user)
        steerx, n_swapped, direction = self.steerx_vector(user, attribution, population)
        description = attribution.description
        return UserSteering(
            user.user_id,
            attribution,
            replace(baseline, description=description),
            replace(steerx, description=description),
            n_swapped,
            direction,
        )

    def fit_many(self, users: Sequence[UserHistory]) -> FitResult:
        """Fit every user; one user's failure is reported in ``failures`` and skipped."""
        failures = {user.user_id: "empty history" for user in users if not user.history}
        population = self.build_population(users)
        fitted: dict[str, UserSteering] = {}
        for user in tqdm(population.users, desc="SteerX users", disable=not self.progress):
            try:
                fitted[user.user_id] = self.fit(user, population)
            except (SteerXError, ValueError) as error:
                failures[user.user_id] = f"{type(error).__name__}: {error}"
        return FitResult(population, fitted, failures)

    # ------------------------------------------------------------------ use
    def generate(
        self,
        prompts: Sequence[str],
        vectors: Sequence[SteeringVector],
        alpha: float | None = None,
        max_new_tokens: int = 40,
    ) -> list[str]:
        """Steered greedy completions, one vector per prompt row (several users in one batch)."""
        if len(prompts) != len(vectors):
            raise SteerXError(
                f"{len(prompts)} prompts but {len(vectors)} vectors: pass one per row"
            )
        steer = stacked_steer(vectors, alpha)
        formatted = [build_prompt(self.adapter.tokenizer, prompt) for prompt in prompts]
        return hooks.generate(self.model, formatted, steer, max_new_tokens=max_new_tokens).texts


def stacked_steer(vectors: Sequence[SteeringVector], alpha: float | None = None) -> hooks.Steer:
    """One :class:`hooks.Steer` with a row per vector (each scaled by its own or the given alpha)."""
    if not vectors:
        raise SteerXError("no vectors given")
    sites = {v.site for v in vectors}
    prints = {v.model_fingerprint for v in vectors}
    if len(sites) > 1 or len(prints) > 1:
        raise SteerXError(f"per-row vectors must share one site and model, got {sites} / {prints}")
    rows = torch.stack([v.vector * (v.alpha if alpha is None else alpha) for v in vectors])
    return hooks.Steer(
        vectors[0].site, rows, 1.0, "prompt_last_and_generated", model_fingerprint=prints.pop()
    )
