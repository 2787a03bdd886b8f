"""The protocol every backend adapter implements, and what they share.

An adapter wraps one model object and knows how to (1) translate canonical TransformerLens site
names to its own hook points, (2) run a forward pass or a generation (greedy; sampled on hf/bridge) with interventions,
and (3) describe the model (layers, width, fingerprint). Positions are computed from a
:class:`StepTracker`, updated before every forward call of the underlying model.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from steerx_lens.core import (
    SITE_KINDS,
    Batch,
    Capture,
    HookContext,
    Inputs,
    Intervention,
    Site,
    TokenScores,
    next_token_scores,
    not_an_intervention,
    parse_site,
    unknown_site,
)
from steerx_lens.errors import (
    BackendError,
    ContextLengthError,
    ModelMismatchError,
    VectorShapeError,
)


def weights_digest(embedding: Tensor) -> str:
    """A short hash of the first rows of the token embedding (identical on every backend)."""
    rows = embedding.detach()[:32].to(torch.float32).cpu()
    rounded = torch.round(rows * 1e4).to(torch.int64).numpy().tobytes()
    return hashlib.sha256(rounded).hexdigest()[:16]


def resid_mid_edit(
    edit: Callable[[Tensor], Tensor], resid_pre: Tensor
) -> Callable[[Tensor], Tensor]:
    """``hook_resid_mid`` for stacks without an editable one: ``resid_mid = resid_pre +
    attn_out``, so edit the sum and hand the attention output back as the difference."""
    return lambda attn_out: edit(resid_pre + attn_out) - resid_pre


class StepTracker:
    """Holds the :class:`HookContext` of the forward call in progress."""

    def __init__(self) -> None:
        self.prompt_len: int | None = None
        self.context: HookContext | None = None

    def update(self, full_mask: Bool[Tensor, "batch total"], n_current: int) -> None:
        """Record a forward call over the last ``n_current`` positions of ``full_mask``."""
        offset = full_mask.shape[1] - n_current
        if offset == 0 or self.prompt_len is None:
            self.prompt_len = full_mask.shape[1] if offset == 0 else offset
        self.context = HookContext(full_mask.bool(), n_current, self.prompt_len)

    def current(self, act: Tensor) -> HookContext:
        """The context for an activation, falling back to 'unpadded' if nothing was recorded."""
        ctx = self.context
        if (
            ctx is None
            or ctx.n_current != act.shape[1]
            or ctx.attention_mask.shape[0] != act.shape[0]
        ):
            return HookContext.unpadded(act.shape[0], act.shape[1], act.device)
        return ctx


class ModelAdapter(ABC):
    """One backend's view of a model. Build with :func:`steerx_lens.backends.get_adapter`."""

    name: str

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tracker = StepTracker()
        self.active: list[Intervention] = []

    # ---------------------------------------------------------------- description
    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of transformer blocks."""

    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the residual stream."""

    @abstractmethod
    def embedding_weight(self) -> Float[Tensor, "vocab d_model"]:
        """The token embedding matrix (read for the model fingerprint and the device)."""

    @property
    def max_positions(self) -> int | None:
        """The model's context length (positions it can attend over), if it declares one."""
        config = getattr(self.model, "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    def check_length(self, n_tokens: int, what: str = "the input") -> None:
        """Raise :class:`ContextLengthError` when ``n_tokens`` exceed :attr:`max_positions`."""
        limit = self.max_positions
        if limit is not None and n_tokens > limit:
            raise ContextLengthError(
                f"{what} has {n_tokens} tokens but the model's context is {limit}: shorten it "
                "(for SteerX, lower max_context_tokens, which caps the history block)"
            )

    @property
    def device(self) -> torch.device:
        """Device of the model's weights; inputs are moved there."""
        return self.embedding_weight().device

    @property
    def torch_module(self) -> nn.Module:
        """The ``torch.nn.Module`` whose forward runs (its parameters are the model's weights)."""
        return self.model

    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """The model frozen (``requires_grad=False``) and in eval mode inside the block, both
        restored after: gradients reach only what is being trained (e.g. a BiPO vector), and
        no dropout makes the objective noisy or draws from the global RNG."""
        module = self.torch_module
        requires_grad = [(p, p.requires_grad) for p in module.parameters()]
        training = [(m, m.training) for m in module.modules()]
        try:
            for parameter, _ in requires_grad:
                parameter.requires_grad_(False)
            module.eval()
            yield
        finally:
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)
            for submodule, flag in training:
                submodule.training = flag

    def fingerprint(self) -> str:
        """``n_layers x d_model : hash of the first embedding rows`` (same on every backend)."""
        return f"{self.n_layers}x{self.d_model}:{weights_digest(self.embedding_weight())}"

    def resolve(self, name: str) -> Site:
        """The canonical :class:`Site` for ``name``, or :class:`UnknownSiteError`."""
        site = parse_site(name, self.n_layers)
        if site is None:
            raise unknown_site(name, self.n_layers)
        return site

    def validate(self, interventions: Sequence[Intervention]) -> None:
        """Check sites, widths and fingerprints before anything runs."""
        for intervention in interventions:
            if not isinstance(intervention, Intervention):
                raise not_an_intervention(intervention)
            site = self.resolve(intervention.site)
            width = getattr(intervention, "width", None)
            expects_d_model = site.kind in SITE_KINDS or site.kind == "hook_embed"
            if width is not None and expects_d_model and width != self.d_model:
                raise VectorShapeError(
                    f"{type(intervention).__name__} at {intervention.site} has width {width}, "
                    f"but the model's d_model is {self.d_model}"
                )
            fingerprint = getattr(intervention, "model_fingerprint", None)
            if fingerprint is not None and fingerprint != self.fingerprint():
                raise ModelMismatchError(
                    f"the steering vector for {intervention.site} was made on model "
                    f"{fingerprint}, but this model is {self.fingerprint()}; recompute the "
                    "vector on this model"
                )

    def grouped(
        self, interventions: Sequence[Intervention]
    ) -> list[tuple[str, list[Intervention]]]:
        """Interventions grouped by site (order kept within a site), sites in execution order.

        Sites are keyed by their resolved name, so ``blocks.-1.x`` and ``blocks.{n-1}.x`` are
        one site.
        """
        groups: dict[str, list[Intervention]] = {}
        for intervention in interventions:
            groups.setdefault(self.resolve(intervention.site).name, []).append(intervention)
        return sorted(groups.items(), key=lambda item: self.site_order(item[0]))

    def site_order(self, name: str) -> tuple[int, int]:
        """Execution-order key of a site: sites are visited (and edited) in this order."""
        return self.resolve(name).order

    # ---------------------------------------------------------------- inputs
    def encode(self, inputs: Inputs, padding_side: Literal["left", "right"] = "left") -> Batch:
        """Turn strings, token ids or a dict into a :class:`Batch` on the model's device."""
        if isinstance(inputs, Batch):
            batch = inputs
        elif isinstance(inputs, dict):
            ids = torch.as_tensor(inputs["input_ids"])
            ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
            mask = inputs.get("attention_mask")
            mask = (
                torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
            )
            batch = Batch(ids, mask)
        elif isinstance(inputs, Tensor):
            ids = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
            batch = Batch(ids, torch.ones_like(ids))
        else:
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            if not texts:
                raise ValueError("no inputs given")
            old_side = self.tokenizer.padding_side
            self.tokenizer.padding_side = padding_side
            try:
                encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
            finally:
                self.tokenizer.padding_side = old_side
            batch = Batch(encoded["input_ids"], encoded["attention_mask"])
        if batch.input_ids.shape[1] == 0:
            raise ValueError("empty input: at least one token is needed")
        return Batch(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its EOS id when it has no pad token."""
        pad = self.tokenizer.pad_token_id
        return int(self.tokenizer.eos_token_id if pad is None else pad)

    # ---------------------------------------------------------------- running
    @contextmanager
    def apply(self, interventions: Sequence[Intervention]) -> Iterator[None]:
        """Hooks active for every forward call inside the block (removed on exit)."""
        self.validate(interventions)
        with self._hooked(list(interventions)):
            yield

    @abstractmethod
    def _hooked(self, interventions: list[Intervention]) -> Any:
        """Context manager installing the interventions as hooks."""

    @abstractmethod
    def forward(
        self, batch: Batch, interventions: Sequence[Intervention], grad: bool = False
    ) -> Float[Tensor, "batch pos vocab"]:
        """Logits of one forward pass; ``grad=True`` keeps the autograd graph (e.g. for BiPO)."""

    supports_sampling: bool = False
    """Whether :meth:`generate` accepts a sampled :class:`Decoding` (hf and bridge backends)."""

    @abstractmethod
    def generate(
        self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int
    ) -> Int[Tensor, "batch total"]:
        """Greedy decoding with the interventions: prompt + ``max_new_tokens`` new ids per row.

        Adapters with :attr:`supports_sampling` also take ``decoding=`` (a :class:`Decoding`).
        """

    def score_next_tokens(
        self, batch: Batch, interventions: Sequence[Intervention], last: int | None = None
    ) -> TokenScores:
        """:class:`TokenScores` of the batch's own tokens under the interventions.

        With ``last``, only the last ``last`` tokens of each row are scored (earlier positions
        hold NaN and -1): the logits of the other positions are never computed where the
        backend allows it (:meth:`tail_logits`), a third of a long row's cost on CPU.
        """
        with torch.no_grad():
            if last is None or last >= batch.input_ids.shape[1] - 1:
                return next_token_scores(self.forward(batch, interventions), batch.input_ids)
            return tail_scores(self.tail_logits(batch, interventions, last + 1), batch.input_ids)

    def tail_logits(
        self, batch: Batch, interventions: Sequence[Intervention], keep: int
    ) -> Float[Tensor, "batch keep vocab"]:
        """Logits of the last ``keep`` positions (here: all computed, then cut)."""
        return self.forward(batch, interventions)[:, -keep:]

    def activations(
        self, batch: Batch, interventions: Sequence[Intervention], sites: Sequence[str]
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        """Activations at ``sites`` (after that site's interventions) of one forward pass.

        The pass stops once every site is captured: layers above the last site cannot change
        activations below it in a causal model, so their compute (and the logits) is skipped.
        """
        store: dict[str, Tensor] = {}
        wanted = set(sites)
        captures = [_CaptureUntilDone(site, store, frozenset(wanted)) for site in sites]
        with torch.no_grad():
            try:
                self.forward(batch, [*interventions, *captures])
            except _AllCaptured:
                pass
        return store

    can_backpropagate: bool = True
    """Whether gradients can flow back through :meth:`forward` (``grad=True``): False for runs
    on a remote server (NDIF), where only the forward results come back."""

    can_start_mid_stack: bool = False
    """Whether :meth:`score_next_tokens_from` can run a pass from a middle block (hf for the
    architectures of :data:`~steerx_lens.backends.layout.MID_STACK_MODEL_TYPES`,
    transformer_lens); callers fall back to full passes where it cannot."""

    def residual_before(self, batch: Batch, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The unsteered input of block ``layer`` (``blocks.{layer}.hook_resid_pre``); the
        blocks above it are not run."""
        site = self.resolve(f"blocks.{layer}.hook_resid_pre").name
        return self.activations(batch, [], [site])[site]

    def score_next_tokens_from(
        self,
        layer: int,
        residual: Float[Tensor, "batch pos d_model"],
        batch: Batch,
        interventions: Sequence[Intervention],
        last: int | None = None,
    ) -> TokenScores:
        """:meth:`score_next_tokens` of a pass that starts at block ``layer`` from ``residual``
        (that block's input, e.g. :meth:`residual_before`); ``batch`` gives the tokens to score
        and the padding.

        Rows that differ only at or above ``layer`` (the same text under different steering
        vectors) share the blocks below it: computed once, not once per row. Every intervention
        must sit in block ``layer`` or above (one below it would never run).
        """
        if not self.can_start_mid_stack:
            raise BackendError(f"the {self.name} backend cannot start a pass at a middle block")
        if residual.shape[:2] != batch.input_ids.shape or residual.shape[2] != self.d_model:
            raise VectorShapeError(
                f"residual of shape {tuple(residual.shape)} for a batch of "
                f"{tuple(batch.input_ids.shape)} tokens and d_model {self.d_model}"
            )
        for intervention in interventions:
            if self.resolve(intervention.site).layer < layer:
                raise ValueError(
                    f"{intervention.site} is below block {layer}, where this pass starts"
                )
        n_positions = batch.input_ids.shape[1]
        keep = n_positions if last is None else min(last + 1, n_positions)
        with torch.no_grad():
            logits = self._tail_logits_from(layer, residual, batch, interventions, keep)
            return tail_scores(logits, batch.input_ids)

    def _tail_logits_from(
        self,
        layer: int,
        residual: Float[Tensor, "batch pos d_model"],
        batch: Batch,
        interventions: Sequence[Intervention],
        keep: int,
    ) -> Float[Tensor, "batch keep vocab"]:
        """Logits of the last ``keep`` positions of a pass from block ``layer``."""
        raise BackendError(f"the {self.name} backend cannot start a pass at a middle block")


class _AllCaptured(Exception):
    """Raised from a capture hook once every requested site is stored: ends the forward."""


@dataclass(frozen=True, eq=False)
class _CaptureUntilDone(Capture):
    """:class:`Capture` that ends the forward pass once all of ``sites`` are in the store."""

    sites: frozenset[str] = frozenset()

    def __call__(
        self, act: Float[Tensor, "batch pos d"], ctx: HookContext
    ) -> Float[Tensor, "batch pos d"]:
        result = super().__call__(act, ctx)
        if self.sites <= self.store.keys():
            raise _AllCaptured
        return result


def finish_after_eos(
    new_tokens: Int[Tensor, "batch new"], eos_ids: set[int], pad_id: int
) -> Int[Tensor, "batch new"]:
    """Replace every token after a row's first EOS by padding (as HF ``generate`` does)."""
    if not eos_ids:
        return new_tokens
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= new_tokens == eos
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return torch.where(after, torch.full_like(new_tokens, pad_id), new_tokens)


def greedy_generate_kwargs(
    generation_config: Any, tokenizer: Any, pad_id: int, max_new_tokens: int
) -> dict[str, Any]:
    """HF ``generate`` keyword arguments for plain greedy decoding (sampling knobs cleared)."""
    eos = sorted(eos_token_ids(generation_config, tokenizer))
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "eos_token_id": eos or None,
        "pad_token_id": pad_id,
    }


GENERATION_BATCH_SIZE = 64
"""Rows decoded together by the library's own batched generations (model answers ŷ, the
evaluation's generations). One decoding step of a small model on CPU costs about as much for 64
rows as for a few (about 0.15 vs 0.35 s per 40-token row at 96 vs 12 rows, demo model, 2 cores),
so generations are batched wider than forward passes."""


@dataclass(frozen=True)
class Decoding:
    """How :func:`steerx_lens.hooks.generate` picks tokens: greedy (the default) or sampled.

    Sampled decoding draws from the softmax of ``logits / temperature`` restricted to the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling; no top-k cut).
    The draw is seeded with ``seed`` inside a forked RNG (:func:`torch.random.fork_rng`), so the
    global torch RNG state is left as it was, and the same prompts, batch, model, device and
    seed give the same texts. Rows of one batch draw from one stream: a row's sample depends on
    the other rows of its batch (as with HF ``generate``); draw several samples per prompt with
    several seeds.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def with_seed(self, seed: int) -> Decoding:
        """The same decoding with another seed (one call per sample)."""
        return replace(self, seed=seed)


GREEDY = Decoding()
"""Greedy decoding (argmax at every step)."""


def generate_kwargs(
    generation_config: Any,
    tokenizer: Any,
    pad_id: int,
    max_new_tokens: int,
    decoding: Decoding | None = None,
) -> dict[str, Any]:
    """HF ``generate`` keyword arguments: :func:`greedy_generate_kwargs` unless ``decoding``
    samples, then temperature and top-p from ``decoding`` (top-k off)."""
    options = greedy_generate_kwargs(generation_config, tokenizer, pad_id, max_new_tokens)
    if decoding is not None and decoding.do_sample:
        options.update(
            do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=0
        )
    return options


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG (CPU, and ``device``'s CUDA generators) for the block, then restore it."""
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def eos_token_ids(model_config: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config / model config / tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


StepFn = Callable[[Int[Tensor, "batch total"], Int[Tensor, "batch total"], int], Tensor]


def greedy_decode(
    step: StepFn,
    batch: Batch,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
) -> Int[Tensor, "batch total"]:
    """Greedy decoding driven by ``step(sequences, mask, n_new) -> logits``.

    ``n_new`` is how many trailing tokens the model has not processed yet (the prompt length on
    the first call, then 1), so KV-cached steps feed only those and cache-free steps re-run
    everything. Rows that emit EOS are padded afterwards; the result always has
    ``max_new_tokens`` new columns.
    """
    sequences, mask = batch.input_ids, batch.attention_mask
    n_rows = sequences.shape[0]
    eos = torch.tensor(sorted(eos_ids), dtype=sequences.dtype, device=sequences.device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=sequences.device)
    n_new = sequences.shape[1]
    for _ in range(max_new_tokens):
        logits = step(sequences, mask, n_new)
        token = logits[:, -1].argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        finished |= torch.isin(token, eos)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        n_new = 1
        if bool(finished.all()):
            break
    return pad_to_length(sequences, batch.input_ids.shape[1] + max_new_tokens, pad_id)


def pad_to_length(
    sequences: Int[Tensor, "batch n"], length: int, pad_id: int
) -> Int[Tensor, "batch length"]:
    """Right-pad generated sequences that stopped early (all rows hit EOS) to ``length``."""
    missing = length - sequences.shape[1]
    if missing <= 0:
        return sequences
    return torch.cat([sequences, sequences.new_full((sequences.shape[0], missing), pad_id)], 1)


def tail_scores(
    logits: Float[Tensor, "batch keep vocab"], input_ids: Int[Tensor, "batch pos"]
) -> TokenScores:
    """Scores of the batch's own tokens from the logits of its last ``keep`` positions,
    left-filled (:func:`left_filled`) to every position when ``keep`` is fewer."""
    keep, n_positions = logits.shape[1], input_ids.shape[1]
    tail = next_token_scores(logits, input_ids[:, -keep:])
    return tail if keep == n_positions else left_filled(tail, n_positions - 1)


def left_filled(tail: TokenScores, width: int) -> TokenScores:
    """``tail``'s scores of the last positions, left-filled to ``width`` positions with NaN
    log-probs and -1 predictions (positions that were not scored)."""
    n_rows, n = tail.logp.shape
    logp = tail.logp.new_full((n_rows, width), float("nan"))
    top = tail.top.new_full((n_rows, width), -1)
    logp[:, width - n :] = tail.logp
    top[:, width - n :] = tail.top
    return TokenScores(logp, top)
