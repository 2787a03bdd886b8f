"""Bi-directional Preference Optimization (BiPO) steering vectors, optionally token-weighted.

BiPO (Cao et al., arXiv 2406.00045) trains one vector ``v`` at one site of a frozen model so that
adding ``d·v`` (``d`` ∈ {−1, +1}, drawn per mini-batch) makes the chosen response more likely
than the rejected one for ``d = +1`` and less likely for ``d = −1``. The loss is the paper's::

    −log σ( d·β·[ (log π_{d·v}(y_w|x) − log π_0(y_w|x)) − (log π_{d·v}(y_l|x) − log π_0(y_l|x)) ] )

with ``π_0`` the unsteered model. Per-token weights on the response log-likelihoods,
``log π(y|x) = Σ_t w_t log p(y_t | x, y_<t)``, are SteerX's reconstruction (the weights are the
token-level causal effects, so the vector learns only the preference-driven tokens); with no
weights every ``w_t = 1`` and the objective is the paper's.

Gradients flow through :func:`steerx_lens.hooks.run` (``grad=True``), so training works on every
backend that supports it (hf, transformer_lens, bridge); on nnsight that call raises
:class:`~steerx_lens.errors.BackendError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from steerx_lens import hooks
from steerx_lens.backbones.base import Sample, SampleLike
from steerx_lens.backbones.inputs import as_samples
from steerx_lens.backends import ModelAdapter, get_adapter
from steerx_lens.text import build_prompt


@dataclass(frozen=True, eq=False)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    Each response is scored as the tokens of ``prompt + response`` after the prompt's tokens (no
    separator is inserted: start responses with a space after plain ``"Answer:"`` prompts, as
    :func:`steerx_lens.text.prompt_and_response` does). ``*_weights`` hold one weight per
    response token (see :func:`response_token_ids`; the full or the truncated count); None means
    uniform weights of 1.
    """

    prompt: str
    chosen: str
    rejected: str
    chosen_weights: Float[Tensor, " n_chosen_tokens"] | None = None
    rejected_weights: Float[Tensor, " n_rejected_tokens"] | None = None

    def __post_init__(self) -> None:
        for name in ("chosen", "rejected"):
            if not getattr(self, name):
                raise ValueError(f"PreferencePair.{name} is an empty response; nothing to score")
        for name in ("chosen_weights", "rejected_weights"):
            weights = getattr(self, name)
            if weights is None:
                continue
            if not isinstance(weights, Tensor) or weights.ndim != 1:
                raise ValueError(f"PreferencePair.{name} must be a 1-D tensor (one per token)")
            if not bool(torch.isfinite(weights).all()):
                raise ValueError(f"PreferencePair.{name} contains NaN or infinity")


@dataclass(frozen=True)
class BiPOConfig:
    """BiPO hyper-parameters.

    ``beta``, ``batch_size`` and ``weight_decay`` are the paper's. ``lr`` is 20x the paper's
    5e-4: the paper trains for many epochs, the default here is 40 steps. Adam moves each
    coordinate by at most about ``lr`` per step, so 40 steps move the vector by at most about
    ``0.4·√d_model``: 9.6 for d_model 576, against a residual norm of about 150 in the demo
    model. Measured in the demo test's setup (6 sign-off pairs, layer 12, 30 steps, batch 2),
    as loss over the last 5 steps, |v|, and the change in held-out log p(" Cheers"):
    5e-3 gave 0.54, 2.8, +0.69 nats; 1e-2 gave 0.42, 5.3, +1.14; 2e-2 gave 0.28, 9.7, +1.73.
    1e-2 is the middle choice. It clearly moves the target within 30-40 steps and keeps |v| at a
    few percent of the residual norm. Use a lower ``lr`` for larger models, whose residual
    coordinates are smaller.
    ``positions`` is where ``d·v`` is added: every position, as in BiPO, or a slice over each
    row's real tokens.
    """

    beta: float = 0.1
    lr: float = 1e-2
    steps: int = 40
    batch_size: int = 4
    weight_decay: float = 0.05
    seed: int = 0
    max_response_tokens: int = 64
    positions: Literal["all"] | slice = "all"

    def __post_init__(self) -> None:
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BiPOConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"BiPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"BiPOConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.positions != "all" and not isinstance(self.positions, slice):
            raise ValueError(
                f"BiPOConfig.positions must be 'all' or a slice, got {self.positions!r}"
            )


@dataclass(frozen=True, eq=False)
class BiPOResult:
    """The trained vector (detached, on the model's device), the loss of every step, the config."""

    vector: Float[Tensor, " d_model"]
    losses: list[float]
    config: BiPOConfig


@dataclass(frozen=True)
class _Scored:
    """One sequence to score: prompt + (truncated) response ids, one weight per response token."""

    input_ids: list[int]
    weights: Float[Tensor, " n_response"]


def response_token_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the tokens of ``prompt + response`` split after the prompt.

    The split is the longest common prefix of the tokenizations of ``prompt`` and
    ``prompt + response``, so a token merged across the boundary counts as a response token.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full_ids = list(tokenizer(prompt + response)["input_ids"])
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    if start == 0:
        raise ValueError(f"the prompt {prompt[:40]!r} has no token of its own to condition on")
    if start == len(full_ids):
        raise ValueError(f"the response {response[:40]!r} adds no token after the prompt")
    return full_ids[:start], full_ids[start:]


def _scored(
    tokenizer: Any, prompt: str, response: str, weights: Tensor | None, max_tokens: int
) -> _Scored:
    prompt_ids, response_ids = response_token_ids(tokenizer, prompt, response)
    kept = response_ids[:max_tokens]
    if weights is None:
        weights = torch.ones(len(kept))
    elif weights.numel() not in (len(response_ids), len(kept)):
        raise ValueError(
            f"{weights.numel()} token weights for a response of {len(response_ids)} tokens "
            f"({len(kept)} kept): give one weight per response token"
        )
    return _Scored(prompt_ids + kept, weights.detach().float().cpu()[: len(kept)])


def _encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_tokens: int
) -> list[tuple[_Scored, _Scored]]:
    if not pairs:
        raise ValueError("BiPO needs at least one PreferencePair")
    encoded = []
    for index, pair in enumerate(pairs):
        try:
            chosen = _scored(tokenizer, pair.prompt, pair.chosen, pair.chosen_weights, max_tokens)
            rejected = _scored(
                tokenizer, pair.prompt, pair.rejected, pair.rejected_weights, max_tokens
            )
        except ValueError as err:
            raise ValueError(f"preference pair {index}: {err}") from None
        encoded.append((chosen, rejected))
    return encoded


def _log_likelihoods(
    adapter: ModelAdapter,
    sequences: Sequence[_Scored],
    interventions: Sequence[hooks.Intervention],
    grad: bool,
) -> Float[Tensor, " n"]:
    """``Σ_t w_t log p(y_t | x, y_<t)`` per sequence, in one left-padded batch.

    With left padding every response ends in the last column, so the logits that predict the
    response tokens are the ``n_response`` columns before it; only those rows get a softmax.
    """
    n, width = len(sequences), max(len(s.input_ids) for s in sequences)
    n_response = max(s.weights.numel() for s in sequences)
    ids = torch.full((n, width), adapter.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    weights = torch.zeros((n, n_response))
    scored: Bool[Tensor, "n n_response"] = torch.zeros((n, n_response), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        length, count = len(sequence.input_ids), sequence.weights.numel()
        ids[row, width - length :] = torch.tensor(sequence.input_ids)
        mask[row, width - length :] = 1
        weights[row, n_response - count :] = sequence.weights
        scored[row, n_response - count :] = True
    logits = hooks.run(
        adapter, {"input_ids": ids, "attention_mask": mask}, *interventions, grad=grad
    )
    scored = scored.to(logits.device)
    predicting = logits[:, width - n_response - 1 : width - 1][scored]
    targets = ids[:, width - n_response :].to(logits.device)[scored]
    log_probs = torch.log_softmax(predicting.float(), dim=-1)
    token_ll = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    weighted = token_ll * weights.to(logits.device)[scored]
    return torch.zeros_like(scored, dtype=weighted.dtype).masked_scatter(scored, weighted).sum(-1)


def _pair_batch_log_likelihoods(
    adapter: ModelAdapter,
    batch: Sequence[tuple[_Scored, _Scored]],
    interventions: Sequence[hooks.Intervention],
    grad: bool,
) -> Float[Tensor, "n_pairs 2"]:
    """Chosen and rejected log-likelihoods of a few pairs, all 2·n sequences in one batch."""
    sequences = [chosen for chosen, _ in batch] + [rejected for _, rejected in batch]
    return _log_likelihoods(adapter, sequences, interventions, grad).view(2, len(batch)).T


def pair_log_likelihoods(
    model: Any,
    pairs: Sequence[PreferencePair],
    *interventions: hooks.Intervention,
    max_response_tokens: int = BiPOConfig.max_response_tokens,
    batch_size: int = BiPOConfig.batch_size,
) -> Float[Tensor, "n_pairs 2"]:
    """Weighted log-likelihoods ``[chosen, rejected]`` of each pair under the interventions.

    The quantity BiPO optimises (no gradient); ``[:, 0] − [:, 1]`` is the preference margin.
    """
    adapter = get_adapter(model)
    encoded = _encode_pairs(adapter.tokenizer, pairs, max_response_tokens)
    return _all_log_likelihoods(adapter, encoded, interventions, batch_size)


def _all_log_likelihoods(
    adapter: ModelAdapter,
    encoded: Sequence[tuple[_Scored, _Scored]],
    interventions: Sequence[hooks.Intervention],
    batch_size: int,
) -> Float[Tensor, "n_pairs 2"]:
    chunks = [
        _pair_batch_log_likelihoods(adapter, encoded[i : i + batch_size], interventions, False)
        for i in range(0, len(encoded), batch_size)
    ]
    return torch.cat(chunks).detach()


@contextmanager
def _deterministic() -> Iterator[None]:
    """Ask torch for deterministic kernels (warning where none exists); restore the setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def train_bipo(
    model: Any,
    site: str,
    pairs: Sequence[PreferencePair],
    config: BiPOConfig = BiPOConfig(),
    progress: bool = True,
) -> BiPOResult:
    """Train a BiPO steering vector at ``site`` on preference ``pairs`` (model frozen).

    ``v`` starts at zero. Each step draws ``batch_size`` distinct pairs and a direction ``d``
    from a generator seeded with ``config.seed`` (the global RNG is untouched), steers with
    ``hooks.Steer(site, d·v)`` and takes one AdamW step on the BiPO loss. The unsteered
    log-likelihoods ``π_0`` are computed once. Same seed, same inputs → the same vector on CPU.
    """
    adapter = get_adapter(model)
    adapter.resolve(site)
    encoded = _encode_pairs(adapter.tokenizer, pairs, config.max_response_tokens)
    return _train(adapter, site, encoded, config, progress)


def _train(
    adapter: ModelAdapter,
    site: str,
    encoded: Sequence[tuple[_Scored, _Scored]],
    config: BiPOConfig,
    progress: bool,
) -> BiPOResult:
    """:func:`train_bipo` on pairs already encoded (see its docstring)."""
    generator = torch.Generator().manual_seed(config.seed)
    vector = torch.zeros(adapter.d_model, device=adapter.device, requires_grad=True)
    optimizer = torch.optim.AdamW([vector], lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    with adapter.frozen_weights(), _deterministic():
        reference = _all_log_likelihoods(adapter, encoded, (), config.batch_size)
        bar = tqdm(range(config.steps), desc=f"BiPO {site}", disable=not progress)
        for _ in bar:
            index = torch.randperm(len(encoded), generator=generator)[: config.batch_size]
            direction = 2.0 * float(torch.randint(2, (), generator=generator)) - 1.0
            steer = hooks.Steer(site, direction * vector, positions=config.positions)
            batch = [encoded[i] for i in index.tolist()]
            steered = _pair_batch_log_likelihoods(adapter, batch, [steer], grad=True)
            gain = steered - reference[index]
            loss = -F.logsigmoid(direction * config.beta * (gain[:, 0] - gain[:, 1])).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return BiPOResult(vector.detach().clone(), losses, config)


def bipo_backbone(
    model: Any,
    site: str,
    chosen: Sequence[SampleLike],
    rejected: Sequence[SampleLike],
    *,
    steps: int = BiPOConfig.steps,
    seed: int = BiPOConfig.seed,
    **_: Any,
) -> Float[Tensor, " d_model"]:
    """The ``"bipo"`` backbone: a BiPO vector trained on the (chosen, rejected) text pairs.

    Each pair is scored as the chat-formatted ``item.input`` followed by each item's text, so a
    minimal-pair twin enters as its decoded text and the preference margin is carried by the
    swapped (preference-driven) tokens only. Whole texts (``str``) and token ids are scored as
    their own tokens (response: every token after the prompt; see
    :mod:`steerx_lens.backbones.inputs`).
    """
    adapter = get_adapter(model)
    tokenizer = adapter.tokenizer
    good_samples = as_samples(tokenizer, chosen, "chosen")
    bad_samples = as_samples(tokenizer, rejected, "rejected")
    if len(good_samples) != len(bad_samples):
        raise ValueError(
            f"BiPO pairs chosen[i] with rejected[i]: got {len(good_samples)} chosen and "
            f"{len(bad_samples)} rejected texts"
        )
    config = BiPOConfig(steps=steps, seed=seed)
    if not any(s.exact_tokens for s in (*good_samples, *bad_samples)):
        pairs = [
            PreferencePair(
                build_prompt(tokenizer, good.item.input), good.item.output, bad.item.output
            )
            for good, bad in zip(good_samples, bad_samples, strict=True)
        ]
        return train_bipo(model, site, pairs, config, progress=False).vector
    adapter.resolve(site)
    if not good_samples:
        raise ValueError("BiPO needs at least one (chosen, rejected) pair")
    encoded = []
    for index, (good, bad) in enumerate(zip(good_samples, bad_samples, strict=True)):
        try:
            encoded.append(
                (
                    _sample_scored(tokenizer, good, config.max_response_tokens),
                    _sample_scored(tokenizer, bad, config.max_response_tokens),
                )
            )
        except ValueError as err:
            raise ValueError(f"preference pair {index}: {err}") from None
    return _train(adapter, site, encoded, config, progress=False).vector


def _sample_scored(tokenizer: Any, sample: Sample, max_tokens: int) -> _Scored:
    """One sample to score: its own tokens when exact, else its chat-formatted text."""
    if sample.exact_tokens and sample.tokens is not None:
        ids, start = sample.tokens.input_ids, sample.tokens.response_start
        kept = list(ids[start : start + max_tokens])
        return _Scored(list(ids[:start]) + kept, torch.ones(len(kept)))
    if not sample.item.output:
        raise ValueError("an empty response; nothing to score")
    prompt = build_prompt(tokenizer, sample.item.input)
    return _scored(tokenizer, prompt, sample.item.output, None, max_tokens)
