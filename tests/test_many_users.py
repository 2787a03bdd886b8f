"""Many users at once: the evaluation mixes rows of different users in one forward batch, and
every user still gets the numbers (and greedy texts) of evaluating it alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from json_numbers import assert_same_numbers
from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory, make_synthetic_users
from steerx_lens.evaluation import experiment as experiment_module
from steerx_lens.evaluation.cells import STEERED_METHODS
from steerx_lens.evaluation.experiment import Experiment, _item_values
from steerx_lens.evaluation.generation import GENERATION_BATCH_SIZE, generation_prompt
from steerx_lens.evaluation.masks import distinct_spans
from steerx_lens.evaluation.metrics import ALL_METHODS, OTHER_METHODS, encode_for_eval, token_nll
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import FitResult, SteerXConfig, stacked_steer
from steerx_lens.vectors import SteeringVector

CONFIG = SteerXConfig(layer=1, answer_tokens=4, max_context_tokens=256)
TOLERANCE = 1e-5
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def users() -> list[UserHistory]:
    return make_synthetic_users(n_users=3, n_history=4, n_heldout=2, seed=2)


@pytest.fixture(scope="module")
def fitted(
    tiny: Any, users: list[UserHistory], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Experiment, dict[int, FitResult]]:
    out = tmp_path_factory.mktemp("many_users")
    options = {"max_new_tokens": MAX_NEW_TOKENS, "progress": False, "n_validation": 0}
    experiment = Experiment(tiny, users, out, CONFIG, **options)
    return experiment, experiment.fit()


def alone_nll(
    model: Any,
    user: UserHistory,
    vector: SteeringVector | None,
    history: Sequence[HistoryItem] = (),
) -> float | None:
    """One method's pooled NLL for one user, from its own ``token_nll`` call (the old protocol)."""
    tokenizer = get_adapter(model).tokenizer
    texts = [encode_for_eval(tokenizer, item, history) for item in user.heldout]
    return _item_values(token_nll(model, texts, [vector] * len(texts), batch_size=8), None).pooled()


def test_users_batched_together_get_the_numbers_they_get_alone(
    tiny: Any, users: list[UserHistory], fitted: tuple[Experiment, FitResult]
) -> None:
    experiment, fits = fitted
    fit = fits[1]
    spans = distinct_spans(experiment.users)
    together = experiment.evaluate_users(users, fits, spans)
    tokenizer = get_adapter(tiny).tokenizer
    for user in users:
        record = together[user.user_id]
        alone_record = experiment.evaluate_users([user], fits, spans)[user.user_id]
        assert_same_numbers(
            record.to_json(), alone_record.to_json(), user.user_id, rel=0.0, abs_tol=TOLERANCE
        )
        mine = fit.users[user.user_id]
        others = [fit.users[uid] for uid in fit.users if uid != user.user_id]
        history = experiment.prompt_history(user)
        expected = {
            "none": alone_nll(tiny, user, None),
            "steerx": alone_nll(tiny, user, mine.steerx),
            "history_prompt": alone_nll(tiny, user, None, history),
        }
        for method, nll in expected.items():
            assert record.scores[method]["nll"] == pytest.approx(nll, abs=TOLERANCE), method
        # *_other: per item, the mean over other users' vectors; items token-weighted
        texts = [encode_for_eval(tokenizer, item) for item in user.heldout]
        per_other = [
            _item_values(token_nll(tiny, texts, [o.baseline] * len(texts)), None) for o in others
        ]
        item_means = [sum(v.values[i] for v in per_other) / len(others) for i in range(len(texts))]
        weights = per_other[0].weights
        expected_other = sum(m * w for m, w in zip(item_means, weights, strict=True)) / sum(weights)
        assert record.scores["baseline_other"]["nll"] == pytest.approx(
            expected_other, abs=TOLERANCE
        )
        source = user.meta.get("source")
        prompts = [generation_prompt(tokenizer, item, source) for item in user.heldout]
        steer = stacked_steer([mine.steerx] * len(prompts))
        alone = hooks.generate(tiny, prompts, steer, max_new_tokens=MAX_NEW_TOKENS)
        assert record.generations is not None
        assert record.generations["steerx"] == [text.strip() for text in alone.texts]


def test_rows_of_different_users_share_one_forward_call(
    tiny: Any,
    users: list[UserHistory],
    fitted: tuple[Experiment, FitResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    experiment, fits = fitted
    fit = fits[1]
    adapter = get_adapter(tiny)
    tokenizer = adapter.tokenizer
    nll_calls: list[int] = []
    nll_forwards: list[list[list[int]]] = []  # token ids of every row, per forward inside token_nll
    generate_calls: list[tuple[list[str], tuple]] = []
    inside_nll = False

    original_forward, original_from, original_nll, original_generate = (
        adapter.score_next_tokens,
        adapter.score_next_tokens_from,
        experiment_module.token_nll,
        hooks.generate,
    )

    def spy_forward(batch: Any, interventions: Any, last: int | None = None) -> Any:
        if inside_nll:
            nll_forwards.append(batch.input_ids.tolist())
        return original_forward(batch, interventions, last=last)

    def spy_from(layer: int, residual: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """A scoring pass that starts at the steering block (rows sharing the blocks below)."""
        if inside_nll:
            nll_forwards.append(batch.input_ids.tolist())
        return original_from(layer, residual, batch, *args, **kwargs)

    def spy_nll(model: Any, texts: list, *args: Any, **kwargs: Any) -> Any:
        nonlocal inside_nll
        nll_calls.append(len(texts))
        inside_nll = True
        try:
            return original_nll(model, texts, *args, **kwargs)
        finally:
            inside_nll = False

    def spy_generate(model: Any, inputs: Any, *interventions: Any, **kwargs: Any) -> Any:
        generate_calls.append((list(inputs), interventions))
        return original_generate(model, inputs, *interventions, **kwargs)

    monkeypatch.setattr(adapter, "score_next_tokens", spy_forward)
    monkeypatch.setattr(adapter, "score_next_tokens_from", spy_from)
    monkeypatch.setattr(experiment_module, "token_nll", spy_nll)
    monkeypatch.setattr(hooks, "generate", spy_generate)
    experiment.evaluate_users(users, fits, distinct_spans(experiment.users))

    n_heldout = sum(len(user.heldout) for user in users)
    described = all(fit.users[u.user_id].description for u in users)
    # none, every steered method, the history prompt (and the description prompt)
    own = 1 + len(STEERED_METHODS) + 1 + (1 if described else 0)
    # own methods + both vector modes (and the description) of every other user
    rows_per_item = own + (3 if described else 2) * (len(users) - 1)
    assert nll_calls == [n_heldout * rows_per_item], "one token_nll call for every user and method"
    batch_size = experiment.pipeline.config.batch_size
    assert len(nll_forwards) == math.ceil(n_heldout * rows_per_item / batch_size)

    responses = {
        user.user_id: [
            (text := encode_for_eval(tokenizer, item)).input_ids[text.response_start :]
            for item in user.heldout
        ]
        for user in users
    }

    def owners(rows: list[list[int]]) -> set[str]:
        """The users whose held-out responses end the rows (rows are left-padded)."""
        return {
            uid
            for row in rows
            for uid, ends in responses.items()
            if any(row[-len(end) :] == end for end in ends)
        }

    assert max(len(owners(rows)) for rows in nll_forwards) >= 2, "no forward mixed users"

    methods = [m for m in ALL_METHODS if not m.startswith("description_prompt") or described]
    n_rows = n_heldout * len(methods)
    assert sum(len(prompts) for prompts, _ in generate_calls) == n_rows
    assert len(generate_calls) == math.ceil(n_rows / GENERATION_BATCH_SIZE), (
        "every method's generations share batches"
    )
    lengths = [
        len(tokenizer(p, add_special_tokens=False).input_ids)
        for prompts, _ in generate_calls
        for p in prompts
    ]
    assert lengths == sorted(lengths), "batches are length-sorted (less padding)"
    # each steered row carries its own method's vector (the unsteered rows a zero one)
    fitted_ids = list(fit.users)

    def added(owner: str, method: str) -> Any:
        vector = experiment.method_vector(owner, method, fits)
        return vector.vector * vector.alpha

    expected = [added(u.user_id, m) for u in users for m in STEERED_METHODS for _ in u.heldout] + [
        added(experiment._other_user(u.user_id, fitted_ids), mode)
        for u in users
        for mode in OTHER_METHODS.values()
        for _ in u.heldout
    ]
    for prompts, interventions in generate_calls:  # a batch with no steered row gets no Steer
        assert len(interventions) <= 1 and all(len(i.vector) == len(prompts) for i in interventions)
    steered = [row for _, steers in generate_calls for s in steers for row in s.vector if row.any()]
    assert len(steered) == len(expected)
    key = lambda t: tuple(t.tolist())  # noqa: E731
    assert sorted(map(key, steered)) == sorted(map(key, expected)), "a row got another vector"


def test_users_per_batch_must_be_positive(tiny: Any, users: list[UserHistory]) -> None:
    with pytest.raises(ValueError, match="users_per_batch"):
        Experiment(tiny, users, "unused", CONFIG, users_per_batch=0)
