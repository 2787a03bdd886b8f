"""Tests of steerx_lens.text: prompt building, the chat wrapper, encoding and padding."""

from __future__ import annotations

import os
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoTokenizer

from steerx_lens.data import HistoryItem
from steerx_lens.models import build_tiny_model_dir, demo_model_dir
from steerx_lens.text import (
    EncodedText,
    build_prompt,
    chat_prompt,
    encode_item,
    history_block,
    pad_batch,
    prompt_and_response,
)


@pytest.fixture(scope="module")
def plain_tokenizer() -> Any:
    """The tiny test tokenizer: no chat template."""
    return AutoTokenizer.from_pretrained(str(build_tiny_model_dir()))


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    """The demo model's tokenizer (SmolLM2 chat template); builds the demo cache if needed."""
    return AutoTokenizer.from_pretrained(str(demo_model_dir()))


def test_build_prompt_plain(plain_tokenizer: Any) -> None:
    assert plain_tokenizer.chat_template is None
    assert build_prompt(plain_tokenizer, "Why?") == "Question: Why?\nAnswer:"
    with_system = build_prompt(plain_tokenizer, "Why?", system="Be brief.")
    assert with_system == "Be brief.\n\nQuestion: Why?\nAnswer:"
    history = [HistoryItem("a", "first\ntext"), HistoryItem("b", "second")]
    prompt = build_prompt(plain_tokenizer, "Why?", history)
    assert prompt == (
        "Question: Here are previous texts by this user:\n- first text\n- second\n\n"
        "Now respond to: Why?\nAnswer:"
    )
    _, full = prompt_and_response(plain_tokenizer, HistoryItem("Why?", "Because."))
    assert full == "Question: Why?\nAnswer: Because."


def test_build_prompt_chat(chat_tokenizer: Any) -> None:
    history = [HistoryItem("a", "Cheers, Sam!")]
    prompt = build_prompt(chat_tokenizer, "Why?", history, system="Be brief.")
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>user\nHere are previous texts by this user:\n- Cheers, Sam!" in prompt
    assert prompt.endswith("Now respond to: Why?<|im_end|>\n<|im_start|>assistant\n")
    _, full = prompt_and_response(chat_tokenizer, HistoryItem("Why?", "Because."))
    assert full.endswith("<|im_start|>assistant\nBecause.")


@pytest.mark.parametrize("which", ["plain_tokenizer", "chat_tokenizer"])
def test_prompt_tokens_prefix_full_text(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(which)
    item = HistoryItem("How should I store beer?", "Cool and dark. Cheers, Sam!")
    history = [HistoryItem("q", "Hoppy ales are great.")]
    prompt, full = prompt_and_response(tokenizer, item, history)
    assert full.startswith(prompt) and full.endswith(item.output)
    assert tokenizer.eos_token not in full[len(prompt) :]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    response = tokenizer.decode(full_ids[len(prompt_ids) :])
    assert response.strip() == item.output


def test_chat_prompt_is_the_chat_part_of_build_prompt(
    plain_tokenizer: Any, chat_tokenizer: Any
) -> None:
    assert chat_prompt(plain_tokenizer, "Why?") == "Why?"  # no template: unchanged
    assert chat_prompt(chat_tokenizer, "Why?", "Be brief.") == build_prompt(
        chat_tokenizer, "Why?", system="Be brief."
    )


@pytest.mark.parametrize("which", ["plain_tokenizer", "chat_tokenizer"])
def test_encode_item_places_block_and_response(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(which)
    item = HistoryItem("How should I store beer?", "Cool and dark. Cheers, Sam!")
    history = [HistoryItem("q", "Hoppy ales are great."), HistoryItem("r", "Stouts too.")]
    encoded = encode_item(tokenizer, item, history)
    block = tokenizer.decode(encoded.input_ids[encoded.context_start : encoded.context_stop])
    assert block == history_block(history)
    assert tokenizer.decode(encoded.response_ids).strip() == item.output
    plain = encode_item(tokenizer, item)
    assert plain.context_len == 0 and plain.response_ids == encoded.response_ids
    swapped = encoded.with_context([0] * encoded.context_len)
    assert swapped.response_ids == encoded.response_ids
    with pytest.raises(ValueError, match="counterfactual context"):
        encoded.with_context([0])


def test_pad_batch_left_pads_with_masks() -> None:
    texts = [EncodedText([5, 6, 7, 8], 3, 1, 2), EncodedText([9, 10], 1)]
    inputs, response, context = pad_batch(texts, pad_id=0)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert response.tolist() == [[False, False, False, True], [False, False, False, True]]
    assert context.tolist() == [[False, True, False, False], [False] * 4]
    assert response.dtype == context.dtype == torch.bool
    with pytest.raises(ValueError, match="non-empty prompt and response"):
        EncodedText([1, 2], 2)
