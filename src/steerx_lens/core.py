"""The leaf of steerx_lens: what an intervention sees and does, with no backend in sight.

- :class:`HookContext` tells an intervention where the current activations sit in the padded
  sequence (padding, KV-cached generation steps), and resolves :data:`Positions` specs;
- :class:`Intervention` is the open protocol (``site``, ``__call__(act, ctx) -> act``, optional
  ``width``); :class:`Steer`, :class:`Patch`, :class:`Ablate` and :class:`Capture` implement it,
  and so can a user's own class;
- :class:`Site` / :func:`parse_site` name hook points with TransformerLens's canonical names;
- :class:`Batch` / :data:`Inputs` are what the entry points accept; :class:`TokenScores` is what
  scoring returns.

Everything else (backends, the hooks facade, the method) builds on this module; it imports
nothing from steerx_lens but :mod:`steerx_lens.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, Union, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steerx_lens.errors import (
    BatchMismatchError,
    InterventionTypeError,
    NonFiniteError,
    PositionError,
    UnknownSiteError,
    VectorShapeError,
)

SITE_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
_SITE_RE = re.compile(r"^blocks\.(-?\d+)\.(" + "|".join(SITE_KINDS) + r")$")


@dataclass(frozen=True)
class Site:
    """A canonical site: its ``name`` (non-negative layer), ``layer`` (-1 for ``hook_embed``)
    and ``kind``."""

    name: str
    layer: int
    kind: str

    @property
    def order(self) -> tuple[int, int]:
        """Execution order key: by layer, then pre < attn_out < mid < mlp_out < post."""
        return (self.layer, -1 if self.kind == "hook_embed" else SITE_KINDS.index(self.kind))


def parse_site(name: str, n_layers: int) -> Site | None:
    """Parse a canonical site name; None when it is not canonical.

    Negative layers count from the end as in Python (``blocks.-1.hook_resid_post`` is the last
    block's output); the returned :class:`Site` carries the non-negative name. The layer range
    is checked.
    """
    if name == "hook_embed":
        return Site(name, -1, "hook_embed")
    match = _SITE_RE.match(name)
    if match is None:
        return None
    given = int(match.group(1))
    layer = given + n_layers if given < 0 else given
    if not 0 <= layer < n_layers:
        raise UnknownSiteError(
            f"site {name!r}: layer {given} is out of range, the model has {n_layers} layers "
            f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end)"
        )
    return Site(f"blocks.{layer}.{match.group(2)}", layer, match.group(2))


def unknown_site(name: str, n_layers: int) -> UnknownSiteError:
    """The :class:`UnknownSiteError` for ``name``, listing the valid canonical site names."""
    return UnknownSiteError(
        f"unknown site {name!r}; use 'hook_embed' or 'blocks.{{l}}.<kind>' with l in "
        f"0..{n_layers - 1} and kind in {SITE_KINDS}"
    )


@dataclass(frozen=True)
class Batch:
    """Token ids and attention mask of one (padded) batch."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]


Inputs = Union[str, Sequence[str], Tensor, dict, Batch]


PositionName = Literal["all", "prompt_last_and_generated"]
Positions = Union[PositionName, slice, Bool[Tensor, "batch pos"]]
POSITION_NAMES: tuple[str, ...] = ("all", "prompt_last_and_generated")


@dataclass(frozen=True)
class HookContext:
    """Where the activations of one forward call sit in the (padded) sequence.

    ``attention_mask`` covers every position seen so far (past and current); the current call
    covers the last ``n_current`` of them. ``prompt_len`` is the padded length of the prompt
    (the first forward call of a generation).
    """

    attention_mask: Bool[Tensor, "batch total"]
    n_current: int
    prompt_len: int

    @staticmethod
    def unpadded(batch: int, n_tokens: int, device: torch.device | str = "cpu") -> HookContext:
        """The context of a plain forward over ``n_tokens`` unpadded tokens."""
        mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
        return HookContext(mask, n_tokens, n_tokens)

    def to(self, device: torch.device | str) -> HookContext:
        """The same context with its mask on ``device`` (e.g. a remote activation's device)."""
        if self.attention_mask.device == torch.device(device):
            return self
        return HookContext(self.attention_mask.to(device), self.n_current, self.prompt_len)

    @property
    def offset(self) -> int:
        """Absolute padded index of the first current position."""
        return self.attention_mask.shape[1] - self.n_current

    @property
    def current_mask(self) -> Bool[Tensor, "batch pos"]:
        """Which current positions hold real (non-padding) tokens."""
        return self.attention_mask[:, self.offset :]

    def absolute_positions(self) -> Int[Tensor, " pos"]:
        """Absolute padded indices of the current positions."""
        return torch.arange(self.offset, self.offset + self.n_current, device=self.device)

    @property
    def device(self) -> torch.device:
        """Device of the attention mask (the activations' device)."""
        return self.attention_mask.device

    def select(self, positions: Positions) -> Bool[Tensor, "batch pos"]:
        """Resolve a position spec to a mask over the current positions (padding excluded)."""
        real = self.current_mask
        if isinstance(positions, str):
            if positions == "all":
                return real
            if positions == "prompt_last_and_generated":
                return real & self._prompt_last_or_generated()
            raise PositionError(f"unknown positions {positions!r}; use one of {POSITION_NAMES}")
        if isinstance(positions, slice):
            return real & self._content_slice(positions)
        if isinstance(positions, Tensor):
            return real & self._explicit(positions)
        raise PositionError(
            f"positions must be one of {POSITION_NAMES}, a slice or a bool [batch, pos] mask, "
            f"got {type(positions).__name__}"
        )

    def _prompt_last_or_generated(self) -> Bool[Tensor, "batch pos"]:
        absolute = self.absolute_positions()
        generated = (absolute >= self.prompt_len).unsqueeze(0)
        prompt_mask = self.attention_mask[:, : self.prompt_len]
        index = torch.arange(self.prompt_len, device=self.device)
        last_prompt = torch.where(prompt_mask, index, -1).amax(dim=1, keepdim=True)  # [batch, 1]
        return generated | (absolute.unsqueeze(0) == last_prompt)

    def _content_slice(self, positions: slice) -> Bool[Tensor, "batch pos"]:
        """A slice over each row's real tokens (index 0 = first non-padding token)."""
        content_index = self.attention_mask.long().cumsum(dim=1)[:, self.offset :] - 1
        n_real = self.attention_mask.sum(dim=1).tolist()
        rows = []
        for row, n in enumerate(n_real):
            start, stop, step = positions.indices(int(n))
            chosen = torch.zeros(max(int(n), 1), dtype=torch.bool, device=self.device)
            chosen[start:stop:step] = True
            rows.append(chosen[content_index[row].clamp(min=0, max=chosen.numel() - 1)])
        return torch.stack(rows)

    def _explicit(self, positions: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        if positions.ndim != 2 or positions.dtype != torch.bool:
            raise PositionError("an explicit positions mask must be a bool tensor [batch, pos]")
        batch = self.attention_mask.shape[0]
        if positions.shape[0] not in (1, batch):
            raise BatchMismatchError(
                f"positions mask has batch {positions.shape[0]}, the input has {batch}"
            )
        positions = positions.to(self.device)
        covered = positions.shape[1]
        out = torch.zeros(positions.shape[0], self.n_current, dtype=torch.bool, device=self.device)
        start, stop = self.offset, min(self.offset + self.n_current, covered)
        if stop > start:
            out[:, : stop - start] = positions[:, start:stop]
        return out.expand(batch, -1)


@runtime_checkable
class Intervention(Protocol):
    """What every intervention implements: a site name and a function on its activations.

    ``__call__`` gets the site's activations ``[batch, pos, d]`` and the :class:`HookContext` of
    the forward call, and returns activations of the same shape (or the same tensor). An
    optional ``width`` attribute (``int`` or ``None``) is checked against the site's width
    before anything runs, and an optional ``model_fingerprint`` against the model's. Subclass
    nothing: any object with these members works on every backend.
    """

    site: str

    def __call__(
        self, act: Float[Tensor, "batch pos d"], ctx: HookContext
    ) -> Float[Tensor, "batch pos d"]: ...


class SupportsToSteer(Protocol):
    """An object that becomes a :class:`Steer` (e.g. a :class:`~steerx_lens.vectors.SteeringVector`)."""

    def to_steer(self) -> Steer:
        """The :class:`Steer` that applies this object."""
        ...


InterventionLike = Union[Intervention, SupportsToSteer]
"""What the entry points of :mod:`steerx_lens.hooks` accept."""


def not_an_intervention(obj: object) -> InterventionTypeError:
    """The error for an object passed where an intervention was expected."""
    return InterventionTypeError(
        f"{type(obj).__name__} is not an intervention: pass hooks.Steer / Patch / Ablate / "
        "Capture, a SteeringVector, or any object with a `site` and `__call__(act, ctx)`"
    )


def as_interventions(items: Sequence[InterventionLike]) -> list[Intervention]:
    """``items`` as interventions: objects with ``to_steer()`` (a
    :class:`~steerx_lens.vectors.SteeringVector`) become their :class:`Steer`, objects with
    ``to_steers()`` (a :class:`~steerx_lens.vectors.SteeringVectorSet`) their list of steers;
    anything else that is not an :class:`Intervention` raises :class:`InterventionTypeError`."""
    out: list[Intervention] = []
    for item in items:
        to_steers = getattr(item, "to_steers", None)
        if not isinstance(item, Intervention) and callable(to_steers):
            out.extend(as_interventions(list(to_steers())))
            continue
        to_steer = getattr(item, "to_steer", None)
        if not isinstance(item, Intervention) and callable(to_steer):
            item = to_steer()
        if not isinstance(item, Intervention):
            raise not_an_intervention(item)
        out.append(item)
    return out


def _check_finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{name} contains NaN or infinity; refusing to apply it")


def _rows(tensor: Float[Tensor, "*rows d"], batch: int, what: str) -> Float[Tensor, "batch_or_1 d"]:
    """View a ``[d]`` or ``[batch, d]`` tensor as ``[batch_or_1, d]``, checking the batch."""
    if tensor.ndim == 1:
        return tensor.unsqueeze(0)
    if tensor.shape[0] not in (1, batch):
        raise BatchMismatchError(
            f"{what} has {tensor.shape[0]} rows (one per batch row) but the input batch has "
            f"{batch} rows"
        )
    return tensor


@dataclass(frozen=True, eq=False)
class Steer:
    """Add ``alpha * vector`` at ``site`` on the chosen positions.

    ``vector`` is ``[d_model]`` (same for every row) or ``[batch, d_model]`` (one per row, e.g.
    one per user). ``operator="project"`` first removes each activation's component along the
    vector's direction, then adds (the activation's projection on v̂ becomes ``alpha·‖v‖``
    whatever it was: "project-then-add"). ``model_fingerprint`` (optional) is checked against the
    model it is applied to.
    """

    site: str
    vector: Float[Tensor, "*rows d_model"]
    alpha: float = 1.0
    positions: Positions = "all"
    model_fingerprint: str | None = None
    operator: Literal["add", "project"] = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor):
            raise VectorShapeError(f"Steer.vector must be a tensor, got {type(self.vector)}")
        if self.vector.ndim not in (1, 2):
            raise VectorShapeError(
                f"Steer.vector must be [d_model] or [batch, d_model], got {tuple(self.vector.shape)}"
            )
        _check_finite(f"steering vector for {self.site}", self.vector)
        if not torch.isfinite(torch.tensor(float(self.alpha))):
            raise NonFiniteError(f"alpha must be finite, got {self.alpha}")
        if self.operator not in OPERATORS:
            raise ValueError(f"Steer.operator must be one of {OPERATORS}, got {self.operator!r}")
        if self.operator == "project":
            _check_nonzero("Steer.vector", self.vector)

    @property
    def width(self) -> int:
        """Width of the vector, checked against the site's d_model."""
        return self.vector.shape[-1]

    def __call__(
        self, act: Float[Tensor, "batch pos d"], ctx: HookContext
    ) -> Float[Tensor, "batch pos d"]:
        _check_width(self, act)
        vec = _rows(self.vector, act.shape[0], "Steer.vector").to(act.device, act.dtype)
        chosen = ctx.to(act.device).select(self.positions).to(act.dtype).unsqueeze(-1)
        if self.operator == "project":
            act = act - chosen * _component(act, vec)
        return act + self.alpha * chosen * vec.unsqueeze(1)


OPERATORS: tuple[str, ...] = ("add", "project")


def _check_nonzero(what: str, vectors: Tensor) -> None:
    if bool((vectors.norm(dim=-1) == 0).any()):
        raise VectorShapeError(f"{what} has a zero row: a direction needs a non-zero vector")


def _component(
    act: Float[Tensor, "batch pos d"], direction: Float[Tensor, "batch_or_1 d"]
) -> Float[Tensor, "batch pos d"]:
    """Each activation's component along its row's direction: ``(act·v̂) v̂``."""
    unit = (direction / direction.norm(dim=-1, keepdim=True)).unsqueeze(1)
    return (act * unit).sum(dim=-1, keepdim=True) * unit


@dataclass(frozen=True, eq=False)
class Patch:
    """Overwrite activations at ``site`` with ``source`` on the chosen positions.

    ``source`` is ``[batch, pos, d]`` (or ``[1, pos, d]``) aligned with the *absolute padded*
    positions of this run, e.g. the cached activations of a counterfactual run over a token
    sequence of the same length.
    """

    site: str
    source: Float[Tensor, "batch pos d_model"]
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.source, Tensor) or self.source.ndim != 3:
            raise VectorShapeError("Patch.source must be a tensor [batch, pos, d_model]")
        _check_finite(f"patch source for {self.site}", self.source)

    @property
    def width(self) -> int:
        """Width of the source activations, checked against the site's d_model."""
        return self.source.shape[-1]

    def __call__(
        self, act: Float[Tensor, "batch pos d"], ctx: HookContext
    ) -> Float[Tensor, "batch pos d"]:
        _check_width(self, act)
        ctx = ctx.to(act.device)
        chosen = ctx.select(self.positions)
        source = self.source
        if source.shape[0] not in (1, act.shape[0]):
            raise BatchMismatchError(
                f"Patch.source has batch {source.shape[0]}, the input has {act.shape[0]}"
            )
        absolute = ctx.absolute_positions()
        inside = absolute < source.shape[1]
        if bool((chosen & ~inside.unsqueeze(0)).any()):
            raise PositionError(
                f"Patch.source covers {source.shape[1]} positions but position "
                f"{int(absolute[-1])} was selected; restrict `positions` or pass a longer source"
            )
        gathered = torch.zeros_like(act)
        gathered[:, inside] = (
            source[:, absolute[inside].to(source.device)]
            .to(act.device, act.dtype)
            .expand(act.shape[0], -1, -1)
        )
        return torch.where(chosen.unsqueeze(-1), gathered, act)


@dataclass(frozen=True, eq=False)
class Ablate:
    """Ablate activations at ``site`` on the chosen positions.

    ``mode="zero"`` zeroes them; ``mode="mean"`` replaces them by ``mean`` if given
    (``[d_model]``), else by the mean over the real (non-padding) positions of the current batch
    at this site; ``mode="direction"`` removes their component along ``direction``
    (``[d_model]`` or one per row, ``[batch, d_model]``): directional ablation, as used to
    remove a refusal or a steering direction.
    """

    site: str
    positions: Positions = "all"
    mode: Literal["zero", "mean", "direction"] = "zero"
    mean: Float[Tensor, " d_model"] | None = None
    direction: Float[Tensor, "*rows d_model"] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ABLATE_MODES:
            raise ValueError(f"Ablate.mode must be one of {ABLATE_MODES}, got {self.mode!r}")
        if self.mean is not None:
            if self.mean.ndim != 1:
                raise VectorShapeError("Ablate.mean must be a [d_model] vector")
            _check_finite(f"ablation mean for {self.site}", self.mean)
        if (self.mode == "direction") != (self.direction is not None):
            raise ValueError("Ablate: pass direction= exactly when mode='direction'")
        if self.direction is not None:
            if self.direction.ndim not in (1, 2):
                raise VectorShapeError("Ablate.direction must be [d_model] or [batch, d_model]")
            _check_finite(f"ablation direction for {self.site}", self.direction)
            _check_nonzero("Ablate.direction", self.direction)

    @property
    def width(self) -> int | None:
        """Width of the mean or direction (None for zero-ablation: nothing to check)."""
        given = self.mean if self.mean is not None else self.direction
        return None if given is None else given.shape[-1]

    def __call__(
        self, act: Float[Tensor, "batch pos d"], ctx: HookContext
    ) -> Float[Tensor, "batch pos d"]:
        ctx = ctx.to(act.device)
        chosen = ctx.select(self.positions).unsqueeze(-1)
        if self.mode == "zero":
            return torch.where(chosen, torch.zeros_like(act), act)
        _check_width(self, act)
        if self.direction is not None:
            rows = _rows(self.direction, act.shape[0], "Ablate.direction")
            return act - chosen.to(act.dtype) * _component(act, rows.to(act.device, act.dtype))
        if self.mean is not None:
            replacement = self.mean.to(act.device, act.dtype)
        else:
            real = ctx.current_mask.unsqueeze(-1).to(act.dtype)
            replacement = (act * real).sum(dim=(0, 1)) / real.sum().clamp(min=1)
        return torch.where(chosen, replacement.expand_as(act), act)


ABLATE_MODES: tuple[str, ...] = ("zero", "mean", "direction")


@dataclass(frozen=True, eq=False)
class Capture:
    """Record the activations at ``site`` (unchanged) into ``store`` as ``[batch, pos, d]``.

    Across KV-cached generation steps the per-step pieces are joined by absolute position; a
    call that starts at position 0 (a new prompt, or a cache-free decoding step) starts afresh.
    """

    site: str
    store: dict[str, Tensor] = field(default_factory=dict)

    width = None

    def __call__(
        self, act: Float[Tensor, "batch pos d"], ctx: HookContext
    ) -> Float[Tensor, "batch pos d"]:
        piece = act.detach().clone()
        previous = self.store.get(self.site)
        if previous is None or ctx.offset == 0:
            self.store[self.site] = piece
        else:  # a KV-cached step: keep what came before this call's first position
            self.store[self.site] = torch.cat([previous[:, : ctx.offset], piece], dim=1)
        return act


def _check_width(intervention: Intervention, act: Tensor) -> None:
    width = getattr(intervention, "width", None)
    if width is not None and width != act.shape[-1]:
        raise VectorShapeError(
            f"{type(intervention).__name__} at {intervention.site} has width {width} but the "
            f"activation there has width {act.shape[-1]}"
        )


def compose(
    interventions: Sequence[Intervention], act: Float[Tensor, "batch pos d"], ctx: HookContext
) -> Float[Tensor, "batch pos d"]:
    """Apply several interventions of one site in order (left to right)."""
    for intervention in interventions:
        act = intervention(act, ctx)
    return act


class TokenScores(NamedTuple):
    """Per position ``p``: log p(token ``p + 1``) and the model's top-1 prediction (float32)."""

    logp: Float[Tensor, "batch pos_minus_1"]
    top: Int[Tensor, "batch pos_minus_1"]


def next_token_scores(
    logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"]
) -> TokenScores:
    """Reduce logits to :class:`TokenScores` (float32 log-softmax over the vocabulary)."""
    logp = logits[:, :-1].float().log_softmax(dim=-1)
    targets = input_ids[:, 1:].to(logp.device)
    return TokenScores(logp.gather(-1, targets[..., None])[..., 0], logp.argmax(dim=-1))
