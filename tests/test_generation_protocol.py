"""The generation protocol (task prompts, echo excluded, decoding, sanity rule) and sampled
decoding in ``hooks.generate``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.backends import available_backends, get_adapter
from steerx_lens.data import HistoryItem
from steerx_lens.errors import BackendError
from steerx_lens.evaluation import generation as gp
from steerx_lens.models import load_tiny_model
from steerx_lens.text import build_prompt, format_user_message, history_block

PROMPTS = ["Hello world. Steering", "The quick brown fox jumps over the lazy", "I love"]
SAMPLE = hooks.Decoding(do_sample=True, temperature=1.0, top_p=1.0, seed=3)


@pytest.fixture(scope="module")
def tiny_hf() -> Any:
    return load_tiny_model("hf")


class ChatTokenizer:
    """A stand-in tokenizer with a chat template (prompt building only)."""

    chat_template = "fake"

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<a>"


class PlainTokenizer:
    chat_template = None


# ------------------------------------------------------------------------------ echo excluded


@pytest.mark.parametrize(
    ("text", "prefix", "rest"),
    [
        ("Review of case against NHS manager", "Review of case against", "NHS manager"),
        ("review  OF case, against: NHS manager", "Review of case against", "NHS manager"),
        ("RT @nytimeshealth: Doctors say no", "RT nytimeshealth: Doctors", "say no"),
        ('"Review of case against." It goes on', "Review of case against", "It goes on"),
        ("Review of case against", "Review of case against", ""),
        ("Reviewing the case against NHS", "Review of case against", None),
        ("Review of", "Review of case against", None),
        ("NHS manager: review of case against", "Review of case against", None),
        ("anything", "?!", None),
    ],
)
def test_strip_echo(text: str, prefix: str, rest: str | None) -> None:
    assert gp.strip_echo(text, prefix) == rest


def test_scored_pair_scores_the_reference_continuation_and_strips_the_echo() -> None:
    tweet = HistoryItem("Review of case against", "Review of case against NHS manager")
    assert gp.scored_pair(tweet, " review of case against the NHS boss", "health_tweets") == (
        "the NHS boss",
        "NHS manager",
    )
    # no echo: the generation is scored as it is
    assert gp.scored_pair(tweet, "NHS manager suspended", "health_tweets") == (
        "NHS manager suspended",
        "NHS manager",
    )
    # the reference does not start with the input (headline -> article): whole reference
    news = HistoryItem("Nigeria summons ambassador", "Nigeria summoned the Indian ambassador.")
    assert gp.scored_pair(news, "Nigeria summons ambassador. Abuja said", "news_outlets") == (
        "Abuja said",
        "Nigeria summoned the Indian ambassador.",
    )
    assert gp.scored_pairs([tweet, news], ["x", "y"]) == (
        ["x", "y"],
        ["NHS manager", "Nigeria summoned the Indian ambassador."],
    )


def test_a_task_can_keep_the_echo() -> None:
    gp.register_task("echo_kept", gp.Task("{input}", strip_echo=False))
    try:
        item = HistoryItem("Title words", "Title words and more")
        assert gp.scored_pair(item, "Title words again", "echo_kept") == (
            "Title words again",
            "and more",
        )
    finally:
        del gp.TASKS["echo_kept"]


# ------------------------------------------------------------------------------ task prompts


def test_task_message_per_source_and_fallback() -> None:
    item = HistoryItem("  Ebola outbreak in Guinea ", "x")
    assert task_of("health_tweets", item) == "Complete this tweet: Ebola outbreak in Guinea"
    assert task_of("news_outlets", item) == (
        "Write the opening of a news article with the headline: Ebola outbreak in Guinea"
    )
    assert task_of("stackexchange", item).startswith("Answer this question:")
    assert task_of("synthetic", item) == "Ebola outbreak in Guinea"
    assert task_of("no_such_source", item) == "Ebola outbreak in Guinea"
    assert task_of(None, item) == "Ebola outbreak in Guinea"
    assert gp.task_for("no_such_source") is gp.GENERIC_TASK


def task_of(source: str | None, item: HistoryItem) -> str:
    return gp.task_message(item, source)


@pytest.mark.parametrize("tokenizer", [ChatTokenizer(), PlainTokenizer()])
def test_generation_prompt_is_build_prompt_of_the_task(tokenizer: Any) -> None:
    item = HistoryItem("Nigeria summons ambassador", "Nigeria summoned ...")
    history = [HistoryItem("a", "Earlier  article\nopening."), HistoryItem("b", "Another one.")]
    task = gp.task_message(item, "news_outlets")
    assert gp.generation_prompt(tokenizer, item, "news_outlets") == build_prompt(tokenizer, task)
    with_history = gp.generation_prompt(tokenizer, item, "news_outlets", history)
    assert with_history == build_prompt(tokenizer, task, history)
    assert format_user_message(task, history) in with_history
    assert "- Earlier article opening.\n- Another one." in with_history


def test_prefill_and_history_template() -> None:
    tokenizer = ChatTokenizer()
    item = HistoryItem("Ebola outbreak in", "Ebola outbreak in Guinea")
    gp.register_task("prefilled", gp.Task("Write a tweet.", prefill=True))
    gp.register_task("styled", gp.Task("Do: {input}", history_template="{history}|{task}"))
    try:
        prompt = gp.generation_prompt(tokenizer, item, "prefilled")
        assert prompt == build_prompt(tokenizer, "Write a tweet.") + "Ebola outbreak in"
        plain = gp.generation_prompt(PlainTokenizer(), item, "prefilled")
        assert plain == "Question: Write a tweet.\nAnswer: Ebola outbreak in"
        styled = gp.generation_prompt(tokenizer, item, "styled", [HistoryItem("q", "old text")])
        assert styled == build_prompt(tokenizer, "- old text|Do: Ebola outbreak in")
    finally:
        del gp.TASKS["prefilled"], gp.TASKS["styled"]


def test_prompt_history_keeps_the_most_recent_items_that_fit(tiny_hf: Any) -> None:
    tokenizer = get_adapter(tiny_hf).tokenizer
    items = [HistoryItem(str(i), f"text number {i} " * 5) for i in range(10)]
    three = len(tokenizer(history_block(items[-3:]))["input_ids"])
    chosen = gp.prompt_history(tokenizer, items, budget=three)
    assert chosen == items[-3:]
    assert gp.prompt_history(tokenizer, items, budget=three - 1) == items[-2:]
    assert gp.prompt_history(tokenizer, items, budget=1) == []


# ------------------------------------------------------------------------------ decoding


def test_greedy_is_unchanged(tiny_hf: Any) -> None:
    """``decoding=None`` / greedy = HF's own greedy ``generate`` (the path before sampling)."""
    adapter = get_adapter(tiny_hf)
    batch = adapter.encode(PROMPTS, padding_side="left")
    reference = tiny_hf.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=8,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=adapter.pad_token_id,
    )
    plain = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=8)
    assert torch.equal(plain.sequences[:, : reference.shape[1]], reference)
    for decoding in (gp.GREEDY, hooks.Decoding(temperature=0.5, seed=9)):
        again = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=8, decoding=decoding)
        assert torch.equal(again.sequences, plain.sequences)


def test_sampling_is_reproducible_per_seed_and_leaves_the_global_rng(tiny_hf: Any) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=12, decoding=SAMPLE)
    assert torch.equal(torch.get_rng_state(), state)
    second = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=12, decoding=SAMPLE)
    other = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=12, decoding=SAMPLE.with_seed(4))
    greedy = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=12)
    assert torch.equal(first.sequences, second.sequences)
    assert not torch.equal(first.sequences, other.sequences)
    assert not torch.equal(first.sequences, greedy.sequences)
    assert first.sequences.shape == greedy.sequences.shape


def test_sampling_is_steered(tiny_hf: Any) -> None:
    steer = hooks.Steer("blocks.1.hook_resid_pre", torch.ones(64), 30.0)
    plain = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=8, decoding=SAMPLE)
    steered = hooks.generate(tiny_hf, PROMPTS, steer, max_new_tokens=8, decoding=SAMPLE)
    assert not torch.equal(plain.sequences, steered.sequences)


@pytest.mark.skipif("bridge" not in available_backends(), reason="no TransformerBridge")
def test_bridge_sampling_matches_hf(tiny_hf: Any) -> None:
    bridge = load_tiny_model("bridge")
    hf = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=8, decoding=SAMPLE)
    out = hooks.generate(bridge, PROMPTS, max_new_tokens=8, decoding=SAMPLE)
    assert out.texts == hf.texts


def test_sampling_elsewhere_is_a_clear_error() -> None:
    others = [b for b in available_backends() if b in ("transformer_lens", "nnsight")]
    if not others:
        pytest.skip("no backend without sampling")
    model = load_tiny_model(others[0])
    with pytest.raises(BackendError, match="sampled decoding is implemented on the hf and bridge"):
        hooks.generate(model, PROMPTS, max_new_tokens=4, decoding=SAMPLE)
    hooks.generate(model, PROMPTS, max_new_tokens=4, decoding=gp.GREEDY)  # greedy still works


@pytest.mark.parametrize(("option", "value"), [("temperature", 0.0), ("top_p", 0.0)])
def test_decoding_rejects_bad_values(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        hooks.Decoding(do_sample=True, **{option: value})


def test_generate_samples(tiny_hf: Any) -> None:
    sampled = gp.generate_samples(tiny_hf, PROMPTS, max_new_tokens=6, decoding=SAMPLE, n_samples=3)
    assert len(sampled) == 3 and all(len(texts) == len(PROMPTS) for texts in sampled)
    seed_4 = hooks.generate(tiny_hf, PROMPTS, max_new_tokens=6, decoding=SAMPLE.with_seed(4))
    assert sampled[1] == [text.strip() for text in seed_4.texts]
    greedy = gp.generate_samples(tiny_hf, PROMPTS, max_new_tokens=6, n_samples=3)
    assert len(greedy) == 1


# ------------------------------------------------------------------------------ sanity rule


def test_generation_informative() -> None:
    ok, message = gp.generation_informative({"none": 10.0, "history_prompt": 12.5}, "tweets")
    assert ok and "informative on tweets" in message
    ok, message = gp.generation_informative(
        {"none": {"rougeL": 13.4}, "history_prompt": {"rougeL": 11.1}}, "health_tweets"
    )
    assert not ok
    assert message.startswith("generation metrics uninformative on health_tweets")
    assert "11.1 <= none 13.4" in message
    tie = {"none": {"rougeL": [10.0, 20.0]}, "history_prompt": {"rougeL": [15.0, 15.0]}}
    assert not gp.generation_informative(tie)[0]

    class Scores:
        def __init__(self, rouge_l: float) -> None:
            self.rougeL = rouge_l

    assert gp.generation_informative({"none": Scores(1.0), "history_prompt": Scores(2.0)})[0]
    ok, message = gp.generation_informative({"none": 1.0})
    assert not ok and "no history_prompt" in message


def test_the_sanity_rule_says_whether_its_paired_difference_is_significant() -> None:
    scores = {"none": 10.0, "history_prompt": 12.5}
    weak = {"mean": 2.5, "n_positive": 5, "n_users": 9, "wilcoxon_p": 0.36}
    ok, message = gp.generation_informative(scores, "news", weak)
    assert ok  # the point rule is unchanged
    assert "ahead for 5 of 9, Wilcoxon p 0.36, not significant" in message
    assert not gp.rouge_check_significant(weak)
    strong = {**weak, "n_positive": 9, "wilcoxon_p": 0.004}
    ok, message = gp.generation_informative(scores, "news", strong)
    assert ok and message.endswith("ahead for 9 of 9, Wilcoxon p 0.004)")
    assert gp.rouge_check_significant(strong)
    backwards = {**strong, "mean": -2.5, "n_positive": 0}  # significant, the wrong way
    assert not gp.rouge_check_significant(backwards)
    untestable = {**weak, "wilcoxon_p": None}
    assert "no test, not significant" in gp.generation_informative(scores, None, untestable)[1]
