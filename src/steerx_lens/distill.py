"""Output-space steering directions: where a vector must point to make the model predict, on a
user's own texts, what it predicts when a *teacher* context is in the prompt.

For texts ``y`` (read without any description or history) and target distributions ``q_t`` over
the next token at every response position, the loss of a steering vector ``v`` added at ``site``
(at the last prompt token and every response token, as in evaluation and generation) is the
cross-entropy ``L(v) = −Σ_t Σ_k q_t(k) log p_v(k | x, y_<t)``; the direction returned is
``−∇_v L`` at ``v = 0``: the first-order step of distilling the teacher into one vector (one
forward and one backward pass per text, no training loop). Targets are signed mixtures of
teacher distributions, ``q = Σ_j c_j p(· | teacher_j)``: ``c = (1,)`` distils one teacher (the
description in the prompt); ``c = (1, −1/k, …)`` keeps only what the first teacher predicts
that the others do not (its gradient is ``Σ_t J_tᵀ (p_others − p_own)``, so what every
description does cancels). ``q`` = the text's own tokens gives the plain likelihood gradient.

This is this library's reconstruction (context distillation into a steering vector); the paper's
abstract states only that the description steers through a backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.backends import ModelAdapter
from steerx_lens.core import Steer
from steerx_lens.text import EncodedText, pad_batch

Teachers = Sequence[tuple[float, EncodedText]] | Float[Tensor, " n_response"] | None
"""One text's targets: ``(coefficient, teacher text)`` pairs, each teacher text with the same
response tokens as the student text read after another prompt; or the text's own tokens
(``q_t`` = the one-hot of ``y_t``) weighted per token by a tensor, or with weight 1 (None)."""


def _response_rows(
    adapter: ModelAdapter, texts: Sequence[EncodedText], steer: Steer | None = None
) -> Float[Tensor, "n_tokens vocab"]:
    """Log-probabilities at the positions that predict each text's response tokens, rows in
    text order (left-padded batch; ``steer`` added at the last prompt token and the response)."""
    inputs, response, _ = pad_batch(texts, adapter.pad_token_id)
    interventions = []
    if steer is not None:
        mask = response.clone()
        mask[:, :-1] |= response[:, 1:] & ~response[:, :-1]
        interventions.append(Steer(steer.site, steer.vector, 1.0, mask))
    grad = steer is not None and steer.vector.requires_grad
    logits = hooks.run(adapter, inputs, *interventions, grad=grad)
    predicting = response[:, 1:].to(logits.device)
    return torch.log_softmax(logits[:, :-1][predicting].float(), dim=-1)


def _usable(students: Sequence[EncodedText], teachers: Sequence[Teachers]) -> list[int]:
    """Students with targets: teacher texts with the student's response tokens, or one
    weight per response token (not all zero)."""
    kept = []
    for i, targets in enumerate(teachers):
        response = students[i].response_ids
        if targets is None:
            kept.append(i)
        elif isinstance(targets, Tensor):
            if targets.shape == (len(response),) and bool(targets.ne(0).any()):
                kept.append(i)
        elif targets and all(t.response_ids == response for _, t in targets):
            kept.append(i)
    return kept


def distillation_loss(
    adapter: ModelAdapter,
    site: str,
    students: Sequence[EncodedText],
    teachers: Sequence[Teachers],
    vector: Float[Tensor, " d_model"],
    batch_size: int = 4,
    backward: bool = False,
) -> float:
    """``L(vector)`` (module docstring) summed over the usable ``students`` (:data:`Teachers`:
    ``teachers[i]`` are student ``i``'s targets). With ``backward`` the gradient is
    accumulated into ``vector.grad`` chunk by chunk (memory of one chunk at a time)."""
    total = 0.0
    kept = _usable(students, teachers)
    with adapter.frozen_weights():
        for start in range(0, len(kept), batch_size):
            chunk = kept[start : start + batch_size]
            texts = [students[i] for i in chunk]
            steered = _response_rows(adapter, texts, Steer(site, vector))
            target = _targets(adapter, texts, [teachers[i] for i in chunk], steered.shape[-1])
            loss = -(target.to(steered.device) * steered).sum()
            if backward:
                loss.backward()
            total += float(loss.detach())
    return total


def distillation_direction(
    adapter: ModelAdapter,
    site: str,
    students: Sequence[EncodedText],
    teachers: Sequence[Teachers],
    batch_size: int = 4,
) -> Float[Tensor, " d_model"] | None:
    """``−∇_v L`` at ``v = 0`` (:func:`distillation_loss`); students whose teacher texts have
    other response tokens (or whose weights are all zero) are skipped; None when none is left."""
    if not _usable(students, teachers):
        return None
    vector = torch.zeros(adapter.d_model, device=adapter.device, requires_grad=True)
    distillation_loss(adapter, site, students, teachers, vector, batch_size, backward=True)
    assert vector.grad is not None
    return -vector.grad.detach().float().cpu()


@torch.no_grad()
def _targets(
    adapter: ModelAdapter,
    students: Sequence[EncodedText],
    teachers: Sequence[Teachers],
    vocab: int,
) -> Float[Tensor, "n_tokens vocab"]:
    """The rows of ``q`` for a chunk of students, in the order :func:`_response_rows` gives."""
    rows = []
    for student, targets in zip(students, teachers, strict=True):
        ids = torch.tensor(student.response_ids)
        if targets is None or isinstance(targets, Tensor):
            weights = torch.ones(len(ids)) if targets is None else targets.float().cpu()
            rows.append(torch.nn.functional.one_hot(ids, vocab).float() * weights[:, None])
            continue
        texts = [text for _, text in targets]
        probs = _response_rows(adapter, texts).exp().view(len(texts), len(ids), -1)
        weights = torch.tensor([c for c, _ in targets], dtype=probs.dtype, device=probs.device)
        rows.append((weights[:, None, None] * probs).sum(0).cpu())
    return torch.cat(rows)
