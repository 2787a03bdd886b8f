"""The SteerX pipeline: user → evidence (attribution, description, ŷ, minimal pairs) → vectors.

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
  r · ‖h‖ · v̂_mp`` (``‖h‖`` = median residual norm at the site; :func:`steerx_combination`).
  Users with no token above the threshold fall back to the shared vector
  (``extra["fallback"]``).

The work splits by what depends on the layer. Per-user *evidence*
(:class:`~steerx_lens.evidence.UserEvidence`: attribution, description, ŷ, minimal pairs;
:meth:`SteerX.evidence`) does not, so it is computed once and reused. *Vectors at a site* are
built from the evidence and a :class:`Population` at that site (:meth:`SteerX.build_population`,
:meth:`SteerX.vectors`); the backbone is looked up in :data:`steerx_lens.backbones.BACKBONES`.

This construction is a reconstruction (the paper's body was not available); it is the one that
beat the shared vector in the feasibility study (DESIGN.md §1), see ``docs/method.md``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
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
    AttributionConfig,
    UserAttribution,
    attribute_user,
)
from steerx_lens.attribution.config import DEFAULT_K_COUNTERFACTUAL, DEFAULT_MAX_CONTEXT_TOKENS
from steerx_lens.backbones import Backbone, Sample, get_backbone
from steerx_lens.backbones.mean_diff import Pool, model_answers, residual_norm, shared_reads
from steerx_lens.backbones.sae_training import train_demo_sae
from steerx_lens.backends import get_adapter
from steerx_lens.constructions import (
    DESCRIPTION_DRIVEN,
    EFFECT_DRIVEN,
    TRAINED_BACKBONES,
    check_construction,
    evidenced_description,
    get_construction,
    with_description,
)
from steerx_lens.data import HistoryItem, UserHistory, read_users, save_users
from steerx_lens.describe import describe, make_describer
from steerx_lens.errors import SteerXError
from steerx_lens.evidence import MinimalPairs, UserEvidence, minimal_pairs
from steerx_lens.runs import user_file_names
from steerx_lens.text import build_prompt, encode_item
from steerx_lens.vectors import SteeringVector

DEFAULT_DEPTH_FRACTION = 0.4
NEUTRAL_ANSWER = "Thank you for your question. Here is a general answer that covers the basics."


@dataclass(frozen=True)
class SteerXConfig:
    """Every documented default of the pipeline (see the module docstring).

    ``backbone`` is a name in :data:`steerx_lens.backbones.BACKBONES` (``"sae"`` = the mean
    difference followed by SAE projection onto at most ``sae_k`` features).
    """

    layer: int | None = None
    site_kind: str = "hook_resid_post"
    backbone: str = "mean_diff"
    pool: Pool = "response_mean"
    negatives: Literal["model", "neutral"] = "model"
    answer_tokens: int = 48
    alpha: float = 1.0
    swap_threshold: float = 2.0
    r: float = 0.1
    k_counterfactual: int = DEFAULT_K_COUNTERFACTUAL
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS
    batch_size: int = 8
    describer: Literal["structured", "template", "llm"] = "structured"
    sae_k: int = 32
    sae_by: Literal["magnitude", "attribution"] = "magnitude"
    bipo_steps: int = 40
    seed: int = 0
    construction: str | None = None
    """None: ``likelihood_description`` (on a remote model, which gives no gradients,
    ``description_contrast``; :func:`default_construction`)."""
    strength: Literal["fixed", "reliability"] = "reliability"
    anchor: Literal["shared", "baseline", "shrunk"] = "baseline"

    @property
    def site(self) -> str:
        """The canonical site name ``blocks.{layer}.{site_kind}``."""
        if self.layer is None:
            raise SteerXError("no layer chosen: call for_model(n_layers) or set layer=")
        return self.site_at(self.layer)

    def site_at(self, layer: int) -> str:
        """The site of kind ``site_kind`` at ``layer`` (e.g. for a sweep over layers)."""
        return f"blocks.{layer}.{self.site_kind}"

    def for_model(self, n_layers: int) -> SteerXConfig:
        """This config with ``layer=None`` resolved to 40% of the model's depth.

        40% gives layer 12 of SmolLM2-135M's 30, the default validated in docs/method.md; the
        layer is always taken from the model, never assumed.
        """
        if self.layer is not None:
            return self
        return replace(self, layer=round(DEFAULT_DEPTH_FRACTION * n_layers))


def default_construction(can_backpropagate: bool = True) -> str:
    """The construction a config without one gets: ``likelihood_description`` for every
    backbone (chosen on validation items of three data sets, for ``mean_diff`` and for
    ``bipo``, docs/method.md). A model that gradients cannot flow back through (a remote NDIF
    run, where only activation backbones run) gets ``description_contrast``, the best
    activation-only construction."""
    return "likelihood_description" if can_backpropagate else "description_contrast"


def steerx_combination(
    shared: Float[Tensor, " d_model"],
    direction: Float[Tensor, " d_model"] | None,
    *,
    r: float,
    residual_norm: float,
) -> Float[Tensor, " d_model"]:
    """The SteerX vector ``shared + r·‖h‖·v̂``: the vector added at ``alpha = 1``.

    ``alpha`` scales the whole vector, as it scales every other method's vector (``alpha = 0``
    is no steering, a negative ``alpha`` negates the personal part too). ``shared`` is the
    leave-one-out shared vector of the user (:meth:`Population.shared_for`), ``direction`` the
    unit personal direction v̂; None (no minimal pair) gives ``shared``.
    """
    if direction is None:
        return shared
    return shared + (r * residual_norm) * direction


def decomposed_baseline(
    baseline: Float[Tensor, " d_model"],
    shared: Float[Tensor, " d_model"],
    personal_norm: float,
) -> Float[Tensor, " d_model"]:
    """The matched control of SteerX: ``shared + personal_norm · unit(baseline − shared)``.

    The user's all-history vector with SteerX's decomposition and personal strength, so a SteerX
    win over it is not just "shared + a fixed-norm personal part". ``personal_norm = 0`` (a
    user SteerX serves with the shared vector alone) gives ``shared``.
    """
    difference = baseline - shared
    length = float(difference.norm())
    if personal_norm == 0.0 or length == 0.0:
        return shared
    return shared + (personal_norm / length) * difference


@dataclass
class UserSteering:
    """One user's SteerX result: attribution, description and the two vectors."""

    user_id: str
    attribution: UserAttribution
    baseline: SteeringVector
    steerx: SteeringVector
    n_swapped_tokens: int
    personal_direction: Tensor | None = None
    random_direction: Tensor | None = None
    anchor_weight: float | None = None
    """With ``anchor="shrunk"``: the split-half reliability w of the user's baseline personal
    part (the anchor is ``shared + w·(baseline − shared)``)."""
    description_swap_direction: Tensor | None = None
    """The ``description_swap`` control's direction once built
    (:meth:`SteerX.description_swap_direction`)."""

    def steerx_at(
        self, shared: SteeringVector, r: float, norm: float, alpha: float = 1.0
    ) -> SteeringVector:
        """The SteerX vector for another ``r`` (and ``alpha``), :func:`steerx_combination`;
        ``shared`` is the user's leave-one-out shared vector."""
        vector = steerx_combination(shared.vector, self.personal_direction, r=r, residual_norm=norm)
        return replace(self.steerx, vector=vector, alpha=alpha, extra={**self.steerx.extra, "r": r})

    def personal_norm(self, r: float, norm: float) -> float:
        """The norm of SteerX's personal part at ``alpha = 1``: ``r·‖h‖`` times the direction's
        norm (1, or the user's reliability weight), 0 without a personal direction."""
        direction = self.personal_direction
        return 0.0 if direction is None else r * norm * float(direction.norm())

    def decomposed_at(
        self, shared: SteeringVector, r: float, norm: float, alpha: float = 1.0
    ) -> SteeringVector:
        """The ``decomposed_baseline`` control (:func:`decomposed_baseline`) at ``r``."""
        vector = decomposed_baseline(
            self.baseline.vector, shared.vector, self.personal_norm(r, norm)
        )
        return replace(
            self.baseline,
            vector=vector,
            alpha=alpha,
            extra={"control": "decomposed_baseline", "r": r},
        )

    def control_at(
        self, control: str, anchor: SteeringVector, r: float, norm: float, alpha: float = 1.0
    ) -> SteeringVector:
        """A control built like SteerX (anchor + ``r·‖h‖`` times a direction) from another
        direction: ``"random_swap"`` (twins that swap as many tokens at random positions,
        :func:`~steerx_lens.evidence.minimal_pairs` with ``randomize``) or
        ``"description_swap"`` (another user's description,
        :meth:`SteerX.description_swap_direction`)."""
        direction = {
            "random_swap": self.random_direction,
            "description_swap": self.description_swap_direction,
        }[control]
        vector = steerx_combination(anchor.vector, direction, r=r, residual_norm=norm)
        return replace(self.steerx, vector=vector, alpha=alpha, extra={"control": control, "r": r})

    @property
    def description(self) -> str | None:
        """The user's natural-language preference description (stage 3)."""
        return self.attribution.description


@dataclass
class Population:
    """What SteerX needs from other users at one site: their histories (counterfactual
    contexts), the shared vector and the residual-norm scale. Saved as ``users.jsonl`` +
    ``shared.safetensors`` + ``population.json``. ``failures`` are the users left out because
    their baseline vector could not be built (why)."""

    users: list[UserHistory]
    shared: SteeringVector
    residual_norm: float
    baselines: dict[str, SteeringVector] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    """The users' descriptions, filled by :meth:`SteerX.fit_many` (and the evaluation) once
    every user's evidence is gathered: what ``description_specific`` contrasts a user's own
    description with."""

    @property
    def site(self) -> str:
        """The site the population's vectors are at."""
        return self.shared.site

    def shared_for(self, user_id: str | None) -> SteeringVector:
        """The shared vector for ``user_id``, leave-one-out: the mean of the *other* users'
        baselines, so the user's own baseline never enters its shared part or its ``shared``
        control. A user outside the population (or a population loaded without baselines) gets
        :attr:`shared`, which is then already a mean over other users."""
        others = [vector.vector for uid, vector in self.baselines.items() if uid != user_id]
        if user_id not in self.baselines or not others:
            return self.shared
        return replace(
            self.shared,
            vector=torch.stack(others).mean(0),
            extra={**self.shared.extra, "n_users": len(others), "left_out": user_id},
        )

    def save(self, folder: str | Path) -> Path:
        """Write the whole population into ``folder``: ``users.jsonl``, ``shared.safetensors``,
        one ``baselines/<user>.safetensors`` per user (the leave-one-out shared vectors need
        them) and ``population.json`` (residual norm, user order, failures, descriptions),
        written last, so a folder with it is complete."""
        folder = Path(folder)
        save_users(self.users, folder / "users.jsonl")
        self.shared.save(folder / "shared.safetensors")
        names = user_file_names(list(self.baselines))
        for uid, vector in self.baselines.items():
            vector.save(folder / "baselines" / f"{names[uid]}.safetensors")
        meta = {
            "residual_norm": self.residual_norm,
            "baselines": names,
            "failures": self.failures,
            "descriptions": self.descriptions,
        }
        write_text(folder / "population.json", json.dumps(meta))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: Any = None) -> Population:
        """Read a folder written by :meth:`save` (one written before baselines were saved
        loads without them: every user then gets :attr:`shared`); with ``model``, check the
        vectors' model. A missing or corrupt part raises a one-line :class:`SteerXError`."""
        folder = Path(folder)
        if not (folder / "population.json").exists():
            raise SteerXError(f"{folder} holds no saved population (population.json missing)")
        try:
            meta = json.loads((folder / "population.json").read_text(encoding="utf-8"))
            residual = float(meta["residual_norm"])
            names = dict(meta.get("baselines", {}))
            failures = {str(k): str(v) for k, v in dict(meta.get("failures", {})).items()}
            descriptions = {str(k): str(v) for k, v in dict(meta.get("descriptions", {})).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SteerXError(f"{folder / 'population.json'} is corrupt: {error}") from None
        shared = SteeringVector.load(folder / "shared.safetensors", model=model)
        baselines = {
            uid: SteeringVector.load(folder / "baselines" / f"{name}.safetensors", model=model)
            for uid, name in names.items()
        }
        users = read_users(folder / "users.jsonl")
        return cls(users, shared, residual, baselines, failures, descriptions)


@dataclass
class FitResult:
    """:meth:`SteerX.fit_many` output: per-user results, the users that failed (why), and the
    evidence of every user that has one (reusable at another site)."""

    population: Population
    users: dict[str, UserSteering]
    failures: dict[str, str]
    evidence: dict[str, UserEvidence] = field(default_factory=dict)


class SteerX:
    """Fit SteerX and baseline vectors for users of one model (at the config's site unless a
    site is given)."""

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
        if self.config.backbone in TRAINED_BACKBONES and not self.adapter.can_backpropagate:
            raise SteerXError(
                f"backbone {self.config.backbone!r} trains through the model's gradients, which "
                "a remote run cannot give; fit on a local model and apply the vectors remotely"
            )
        if self.config.construction is None:
            construction = default_construction(self.adapter.can_backpropagate)
            self.config = replace(self.config, construction=construction)
        limit = self.adapter.max_positions
        if limit is not None and self.config.max_context_tokens > limit:
            raise SteerXError(
                f"max_context_tokens={self.config.max_context_tokens} exceeds the model's "
                f"context of {limit} tokens; set SteerXConfig(max_context_tokens<={limit})"
            )
        self.adapter.resolve(self.config.site)
        self.backbone: Backbone = get_backbone(self.config.backbone)
        check_construction(
            self.config.construction, self.config.backbone, self.adapter.can_backpropagate
        )
        if self.config.strength not in ("fixed", "reliability"):
            raise SteerXError(
                f"strength must be 'fixed' or 'reliability', got {self.config.strength!r}"
            )
        if self.config.anchor not in ("shared", "baseline", "shrunk"):
            raise SteerXError(
                f"anchor must be 'shared', 'baseline' or 'shrunk', got {self.config.anchor!r}"
            )
        if self.config.sae_by not in ("magnitude", "attribution"):
            raise SteerXError(
                f"sae_by must be 'magnitude' or 'attribution', got {self.config.sae_by!r}"
            )
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.sae = sae
        self.progress = progress
        self._answers: dict[str, str] = {}
        self._attributions: dict[tuple[str, tuple[str, ...]], UserAttribution] = {}

    # ------------------------------------------------------------------ evidence (no layer)
    def model_answers(self, items: Sequence[HistoryItem]) -> list[str]:
        """The model's own greedy answers ŷ to the items' prompts (memoised and disk-cached)."""
        tokenizer = self.adapter.tokenizer
        return self.answers([build_prompt(tokenizer, item.input) for item in items])

    def answers(self, prompts: Sequence[str]) -> list[str]:
        """Greedy answers of ``config.answer_tokens`` tokens to formatted ``prompts``, memoised
        per prompt (a subset of prompts already answered costs nothing) and disk-cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._answers))
        if missing:
            answers = model_answers(
                self.model,
                missing,
                self.config.answer_tokens,
                cache_dir=self.cache_dir,
                progress=self.progress,
            )
            self._answers.update(zip(missing, answers, strict=True))
        return [self._answers[prompt] for prompt in prompts]

    def negatives(self, items: Sequence[HistoryItem]) -> list[HistoryItem]:
        """ŷ (``negatives="model"``) or a neutral answer for each item's prompt."""
        if self.config.negatives == "neutral":
            return [HistoryItem(item.input, NEUTRAL_ANSWER) for item in items]
        return [
            HistoryItem(item.input, y)
            for item, y in zip(items, self.model_answers(items), strict=True)
        ]

    def attribute(self, user: UserHistory, population: Population) -> UserAttribution:
        """Stage 1-3 for one user (memoised per user: attribution does not depend on the layer)."""
        key = (user.user_id, tuple(item.output for item in user.history))
        if key in self._attributions:
            return self._attributions[key]
        config = AttributionConfig(
            k_counterfactual=self.config.k_counterfactual,
            max_context_tokens=self.config.max_context_tokens,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
        )
        attribution = attribute_user(self.model, user, population.users, config)
        describer = make_describer(self.config.describer, self.model)
        self._attributions[key] = describe(attribution, describer)
        return self._attributions[key]

    def minimal_pairs(self, user: UserHistory, attribution: UserAttribution) -> MinimalPairs:
        """Each history text with a token above ``swap_threshold`` and its swapped twin."""
        return minimal_pairs(
            self.adapter.tokenizer, user, attribution.items, self.config.swap_threshold
        )

    def evidence(self, user: UserHistory, population: Population) -> UserEvidence:
        """Attribution, description, ŷ and minimal pairs of one user: reusable at every site.

        Only ``population.users`` (the counterfactual contexts) is read, not its vectors.
        """
        attribution = self.attribute(user, population)
        negatives = self.negatives(user.history)
        return UserEvidence(user, attribution, negatives, self.minimal_pairs(user, attribution))

    # ------------------------------------------------------------------ vectors at a site
    def backbone_options(self) -> dict[str, Any]:
        """The options every backbone call gets; each backbone uses the ones it needs.

        ``sae`` is a function ``site -> SAE`` (:meth:`_sae`), so an SAE is only trained or
        loaded by a backbone that projects.
        """
        config = self.config
        return {
            "pool": config.pool,
            "batch_size": config.batch_size,
            "steps": config.bipo_steps,
            "seed": config.seed,
            "sae": self._sae,
            "sae_k": config.sae_k,
            "sae_by": config.sae_by,
        }

    def contrast(
        self, chosen: Sequence[Sample], rejected: Sequence[Sample], site: str | None = None
    ) -> Float[Tensor, " d_model"]:
        """The backbone's vector at ``site`` (default: the config's) for paired samples.

        In SteerX mode ``rejected`` are the minimal-pair twins, so only the swapped
        (preference-driven) tokens separate the two sides.
        """
        site = site or self.config.site
        return self.backbone(self.model, site, chosen, rejected, **self.backbone_options())

    def _sae(self, site: str) -> Any:
        """The SAE to project with: the one given, else the cached demo SAE at ``site``."""
        if self.sae is None:
            self.sae = train_demo_sae(site=site)
        return self.sae

    def _vector(
        self, raw: Tensor, mode: str, user_id: str | None, site: str, **extra: Any
    ) -> SteeringVector:
        return SteeringVector(
            raw.detach().float().cpu(),
            site,
            self.adapter.fingerprint(),
            backbone=self.config.backbone,
            mode=mode,  # type: ignore[arg-type]
            alpha=self.config.alpha,
            user_id=user_id,
            extra=dict(extra),
        )

    def baseline_vector(
        self,
        user: UserHistory,
        site: str | None = None,
        negatives: Sequence[HistoryItem] | None = None,
    ) -> SteeringVector:
        """Classic all-history steering at ``site``: the user's texts vs ``negatives`` (default:
        :meth:`negatives`), every history item."""
        if not user.history:
            raise SteerXError(f"user {user.user_id!r} has an empty history: nothing to fit")
        rejected = self.negatives(user.history) if negatives is None else negatives
        site = site or self.config.site
        raw = self.contrast(
            [Sample(item) for item in user.history], [Sample(item) for item in rejected], site
        )
        return self._vector(raw, "baseline", user.user_id, site)

    def build_population(self, users: Sequence[UserHistory], site: str | None = None) -> Population:
        """Baseline vectors of ``users`` at ``site`` → their mean (the shared vector) and the
        residual-norm scale. A user whose baseline fails on its data (a ``ValueError``, e.g.
        an item longer than the model's context) is left out and listed in ``failures``."""
        site = site or self.config.site
        self.adapter.resolve(site)
        usable = [user for user in users if user.history]
        if len(usable) < 2:
            raise SteerXError(
                "SteerX needs a population of at least 2 users with histories (other users' "
                "contexts are the counterfactuals and their mean vector is the shared part)"
            )
        if self.config.negatives == "model":  # every user's ŷ in shared batches, up front
            try:
                self.model_answers([item for user in usable for item in user.history])
            except ValueError:
                pass  # some user's data fails: the per-user calls below say whose
        baselines, failures = {}, {}
        for user in tqdm(usable, desc="baseline vectors", disable=not self.progress):
            try:
                baselines[user.user_id] = self.baseline_vector(user, site)
            except ValueError as error:
                failures[user.user_id] = f"{type(error).__name__}: {error}"
        usable = [user for user in usable if user.user_id in baselines]
        if len(usable) < 2:
            raise SteerXError(f"fewer than 2 users left for the population; failed: {failures}")
        shared = torch.stack([v.vector for v in baselines.values()]).mean(0)
        tokenizer = self.adapter.tokenizer
        texts = [encode_item(tokenizer, item) for user in usable for item in user.history[:4]]
        norm = residual_norm(self.model, site, texts, self.config.batch_size)
        shared_vector = self._vector(shared, "shared", None, site, n_users=len(baselines))
        return Population(
            list(usable),
            replace(shared_vector, residual_norm=norm),
            norm,
            baselines,
            failures,
        )

    def personal_direction(
        self, pairs: MinimalPairs, site: str
    ) -> Float[Tensor, " d_model"] | None:
        """The unit minimal-pair component v̂ at ``site`` (None when there is no pair)."""
        if not pairs.originals:
            return None
        return _unit(self.contrast(pairs.originals, pairs.twins, site))

    def personal_component(
        self, evidence: UserEvidence, population: Population, site: str
    ) -> Float[Tensor, " d_model"] | None:
        """The raw personal component of the config's construction
        (:data:`steerx_lens.constructions.CONSTRUCTIONS`), None without evidence."""
        return get_construction(self.config.construction)(self, evidence, population, site)

    def reliability(self, evidence: UserEvidence, population: Population, site: str) -> float:
        """Split-half reliability of the personal direction, in [0, 1]: the cosine ``c``
        between the components built from the user's odd and even items (pairs for
        ``minimal_pairs``), Spearman-Brown corrected to the whole set, ``2c / (1 + c)``,
        0 when ``c <= 0`` or a half has no evidence. A user whose items disagree on the
        direction gets a small weight, and no evidence gives the shared vector alone."""
        halves = [self.personal_component(half, population, site) for half in _halves(evidence)]
        return split_half_reliability(*halves)

    def baseline_reliability(
        self, evidence: UserEvidence, population: Population, site: str
    ) -> float:
        """Split-half reliability (as :meth:`reliability`) of the user's *baseline* personal
        part ``baseline − shared₋ᵤ``: the weight of ``anchor="shrunk"``."""
        shared = population.shared_for(evidence.user_id).vector
        halves = [
            self.baseline_vector(half.user, site, half.negatives).vector - shared
            for half in _halves(evidence)
            if half.user.history
        ]
        return split_half_reliability(*halves) if len(halves) == 2 else 0.0

    def anchor(
        self,
        user_id: str,
        population: Population,
        baseline: SteeringVector | None = None,
        weight: float | None = None,
    ) -> SteeringVector:
        """What SteerX's personal part is added to (``config.anchor``): the user's
        leave-one-out shared vector (``"shared"``), the user's own all-history baseline
        (``"baseline"``), or the baseline shrunk toward the shared vector by its split-half
        reliability ``weight`` (``"shrunk"``: ``shared + weight·(baseline − shared)``)."""
        shared = population.shared_for(user_id)
        if self.config.anchor == "shared":
            return shared
        own = baseline if baseline is not None else population.baselines[user_id]
        if self.config.anchor == "baseline":
            return own
        if weight is None:
            raise SteerXError(
                'anchor="shrunk" needs the user\'s baseline reliability weight: build the '
                "vectors with SteerX.vectors(evidence, population) or fit_many(users)"
            )
        return replace(own, vector=shared.vector + weight * (own.vector - shared.vector))

    def method_vector(
        self, fit: FitResult, user_id: str, method: str, alpha: float, r: float | None = None
    ) -> SteeringVector:
        """The vector a steered method adds for ``user_id`` in ``fit`` at ``alpha`` (and ``r``,
        default the config's): ``shared`` (leave-one-out), ``baseline``, ``steerx``, and the
        controls ``decomposed_baseline``, ``random_swap`` and ``description_swap``."""
        population, mine = fit.population, fit.users[user_id]
        shared, norm = population.shared_for(user_id), population.residual_norm
        r = self.config.r if r is None else r
        if method == "shared":
            return replace(shared, alpha=alpha)
        if method == "baseline":
            return replace(mine.baseline, alpha=alpha)
        anchor = self.anchor(user_id, population, mine.baseline, mine.anchor_weight)
        if method == "steerx":
            return mine.steerx_at(anchor, r, norm, alpha)
        if method == "decomposed_baseline":
            return mine.decomposed_at(shared, r, norm, alpha)
        if method == "description_swap" and mine.description_swap_direction is None:
            mine.description_swap_direction = self.description_swap_direction(fit, user_id)
        if method in ("random_swap", "description_swap"):
            return mine.control_at(method, anchor, r, norm, alpha)
        raise SteerXError(f"{method!r} adds no vector")

    def description_partner(self, fit: FitResult, user_id: str) -> str | None:
        """The other user whose description the ``description_swap`` control uses: drawn
        (seeded by the seed and the user's id) among the fitted users with a description."""
        others = sorted(
            uid
            for uid, steering in fit.users.items()
            if uid != user_id and evidenced_description(steering.description) is not None
        )
        if not others:
            return None
        return random.Random(f"{self.config.seed}:{user_id}:description").choice(others)

    def description_swap_direction(self, fit: FitResult, user_id: str) -> Tensor | None:
        """The ``description_swap`` control's direction: the config's construction built from
        the user's own evidence with :meth:`description_partner`'s description instead of the
        user's, scaled to the norm of the user's own direction (the same strength). Equal to
        the user's own direction for constructions that do not read the description, and
        None when the user has no personal direction."""
        mine = fit.users[user_id]
        own = mine.personal_direction
        if own is None or self.config.construction not in DESCRIPTION_DRIVEN:
            return own
        partner = self.description_partner(fit, user_id)
        if partner is None:
            return None
        evidence = with_description(fit.evidence[user_id], fit.users[partner].description)
        component = self.personal_component(evidence, fit.population, fit.population.site)
        if component is None or float(component.norm()) == 0.0:
            return None
        return float(own.norm()) * _unit(component)

    def _steerx_vector(
        self,
        user_id: str,
        direction: Tensor | None,
        population: Population,
        n_pairs: int,
        n_swapped: int,
        anchor_weight: float | None = None,
        baseline: SteeringVector | None = None,
    ) -> SteeringVector:
        """The SteerX vector at the population's site (alpha = 1 vector, config's ``r``)."""
        site, r = population.site, self.config.r
        raw = steerx_combination(
            self.anchor(user_id, population, baseline, anchor_weight).vector,
            direction,
            r=r,
            residual_norm=population.residual_norm,
        )
        if direction is None:
            return self._vector(raw, "steerx", user_id, site, fallback=True, r=r)
        return self._vector(
            raw,
            "steerx",
            user_id,
            site,
            fallback=False,
            r=r,
            n_pairs=n_pairs,
            n_swapped_tokens=n_swapped,
        )

    def steerx_vector(
        self, user: UserHistory, attribution: UserAttribution, population: Population
    ) -> tuple[SteeringVector, int, Tensor | None]:
        """Leave-one-out shared vector + the user's scaled minimal-pair component (see the
        module docstring). Returns the vector, the number of swapped tokens and the unit
        personal direction."""
        pairs = self.minimal_pairs(user, attribution)
        direction = self.personal_direction(pairs, population.site)
        baseline = None
        if self.config.anchor != "shared" and user.user_id not in population.baselines:
            baseline = self.baseline_vector(user, population.site)
        vector = self._steerx_vector(
            user.user_id,
            direction,
            population,
            len(pairs.originals),
            pairs.n_swapped_tokens,
            baseline=baseline,
        )
        return vector, pairs.n_swapped_tokens, direction

    def vectors(self, evidence: UserEvidence, population: Population) -> UserSteering:
        """The user's baseline and SteerX vectors (and the ``random_swap`` control's
        direction) at the population's site, from its evidence."""
        baseline = population.baselines.get(evidence.user_id) or self.baseline_vector(
            evidence.user, population.site, evidence.negatives
        )
        site = population.site
        component = self.personal_component(evidence, population, site)
        direction = None if component is None else _unit(component)
        random_direction = self.random_direction(evidence, population, site)
        if self.config.strength == "reliability" and direction is not None:
            weight = self.reliability(evidence, population, site)
            direction = weight * direction if weight > 0 else None
            if random_direction is not None:
                random_direction = weight * random_direction if weight > 0 else None
        anchor_weight = None
        if self.config.anchor == "shrunk":
            anchor_weight = self.baseline_reliability(evidence, population, site)
        return self.assemble(
            evidence, population, baseline, direction, random_direction, anchor_weight
        )

    def assemble(
        self,
        evidence: UserEvidence,
        population: Population,
        baseline: SteeringVector,
        direction: Tensor | None,
        random_direction: Tensor | None,
        anchor_weight: float | None = None,
    ) -> UserSteering:
        """A :class:`UserSteering` from its parts (e.g. read back from a saved fit)."""
        pairs = evidence.pairs
        steerx = self._steerx_vector(
            evidence.user_id,
            direction,
            population,
            len(pairs.originals),
            pairs.n_swapped_tokens,
            anchor_weight,
            baseline,
        )
        description, norm = evidence.description, population.residual_norm
        return UserSteering(
            evidence.user_id,
            evidence.attribution,
            replace(baseline, description=description, residual_norm=norm),
            replace(steerx, description=description, residual_norm=norm),
            pairs.n_swapped_tokens,
            direction,
            random_direction,
            anchor_weight,
        )

    def random_direction(
        self, evidence: UserEvidence, population: Population, site: str
    ) -> Float[Tensor, " d_model"] | None:
        """The ``random_swap`` control's unit direction: for constructions that read the
        causal effects' positions (:data:`~steerx_lens.constructions.EFFECT_DRIVEN`), the
        construction built with each item's effects shuffled over its tokens (as many
        selected tokens, at random positions); otherwise the minimal-pair direction of
        :meth:`random_swap_pairs`. Seeded by the config's seed and the user's id."""
        if self.config.construction in EFFECT_DRIVEN:
            rng = random.Random(f"{self.config.seed}:{evidence.user_id}")
            items = [
                replace(
                    item,
                    effects=item.effects[rng.sample(range(len(item.effects)), len(item.effects))],
                )
                for item in evidence.attribution.items
            ]
            shuffled = replace(evidence, attribution=replace(evidence.attribution, items=items))
            component = self.personal_component(shuffled, population, site)
            return None if component is None or float(component.norm()) == 0 else _unit(component)
        return self.personal_direction(self.random_swap_pairs(evidence), site)

    def random_swap_pairs(self, evidence: UserEvidence) -> MinimalPairs:
        """The ``random_swap`` control's pairs: in each item, as many tokens as SteerX swaps,
        at random positions (seeded by the config's seed and the user's id)."""
        return minimal_pairs(
            self.adapter.tokenizer,
            evidence.user,
            evidence.attribution.items,
            self.config.swap_threshold,
            randomize=random.Random(f"{self.config.seed}:{evidence.user_id}"),
        )

    # ------------------------------------------------------------------ users
    def fit(self, user: UserHistory, population: Population | None = None) -> UserSteering:
        """Evidence, then baseline and SteerX vectors of one user at the population's site."""
        if population is None:
            raise SteerXError(
                "SteerX.fit needs a reference population (other users' histories and the shared "
                "vector): build one with SteerX.build_population(users) or Population.load(dir), "
                "or call fit_many(users)"
            )
        return self.vectors(self.evidence(user, population), population)

    def fit_many(
        self,
        users: Sequence[UserHistory],
        site: str | None = None,
        evidence: Mapping[str, UserEvidence] | None = None,
    ) -> FitResult:
        """Fit every user at ``site`` (default: the config's); one user's failure is reported
        in ``failures`` and skipped. ``evidence`` already gathered (e.g. by a fit at another
        site) is reused; the result carries every user's evidence."""
        failures = {user.user_id: "empty history" for user in users if not user.history}
        with shared_reads(self.model):  # texts read more than once are read once
            population = self.build_population(users, site)
            failures.update(population.failures)
            gathered = dict(evidence or {})
            fitted: dict[str, UserSteering] = {}
            for user in tqdm(population.users, desc="SteerX evidence", disable=not self.progress):
                try:
                    if user.user_id not in gathered:
                        gathered[user.user_id] = self.evidence(user, population)
                except (SteerXError, ValueError) as error:
                    failures[user.user_id] = f"{type(error).__name__}: {error}"
            population.descriptions = described(gathered)
            for user in tqdm(population.users, desc="SteerX vectors", disable=not self.progress):
                if user.user_id not in gathered:
                    continue
                try:
                    fitted[user.user_id] = self.vectors(gathered[user.user_id], population)
                except (SteerXError, ValueError) as error:
                    failures[user.user_id] = f"{type(error).__name__}: {error}"
        return FitResult(population, fitted, failures, gathered)

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


def described(evidence: Mapping[str, UserEvidence]) -> dict[str, str]:
    """The users' descriptions that have evidence behind them (:attr:`Population.descriptions`)."""
    return {
        uid: text
        for uid, e in evidence.items()
        if (text := evidenced_description(e.description)) is not None
    }


def _unit(vector: Tensor) -> Float[Tensor, " d_model"]:
    """``vector / ‖vector‖`` as float32 on the CPU."""
    return (vector / vector.norm()).detach().float().cpu()


def split_half_reliability(first: Tensor | None, second: Tensor | None) -> float:
    """``2c / (1 + c)`` for the cosine ``c`` of two halves' vectors (Spearman-Brown), in
    [0, 1]; 0 when they disagree (``c <= 0``) or a half is missing or zero."""
    if first is None or second is None or float(first.norm()) == 0 or float(second.norm()) == 0:
        return 0.0
    cosine = float(_unit(first) @ _unit(second))
    return 0.0 if cosine <= 0 else 2 * cosine / (1 + cosine)


def _halves(evidence: UserEvidence) -> tuple[UserEvidence, UserEvidence]:
    """The user's evidence split by item parity: even-indexed and odd-indexed history items
    (with their negatives, minimal pairs and token effects, re-indexed into the half)."""
    user, pairs, attribution = evidence.user, evidence.pairs, evidence.attribution
    halves = []
    for parity in (0, 1):
        keep = slice(parity, None, 2)
        effects = [
            replace(item, item_index=item.item_index // 2)
            for item in attribution.items
            if item.item_index % 2 == parity
        ]
        halves.append(
            UserEvidence(
                replace(user, history=user.history[keep]),
                replace(attribution, items=effects),
                evidence.negatives[keep],
                MinimalPairs(
                    pairs.originals[keep],
                    pairs.twins[keep],
                    pairs.n_swapped_tokens,
                ),
            )
        )
    return halves[0], halves[1]


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
