"""The steering demo's texts, prompts and contrast vector (``steerx demo``, tutorials 01 and 06).

A contrast that is easy to see in a 135M model: enthusiastic vs. flat statements.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.backends import get_adapter
from steerx_lens.text import chat_prompt

POSITIVE_TEXTS = [
    "Wow, this is absolutely amazing! I love it so much!",
    "What a fantastic, wonderful day! Everything is brilliant!",
    "I'm thrilled, this is the best thing ever! Fantastic!",
]
NEGATIVE_TEXTS = [
    "This is a statement about an object. It exists.",
    "The day occurred. Events took place as scheduled.",
    "I note the item. It is an item of the usual kind.",
]
DEMO_PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of the new library?",
    "Describe the weather today.",
]


def contrast_vector(model: Any, site: str) -> Float[Tensor, " d_model"]:
    """Mean-difference vector: mean activation over positive minus negative texts (all tokens)."""

    def mean_activation(texts: list[str]) -> Float[Tensor, " d_model"]:
        batch = get_adapter(model).encode(texts)
        acts = hooks.activations(model, batch, [site])
        mask = batch.attention_mask.unsqueeze(-1).to(acts[site].dtype)
        return (acts[site] * mask).sum(dim=(0, 1)) / mask.sum()

    return mean_activation(POSITIVE_TEXTS) - mean_activation(NEGATIVE_TEXTS)


def chat_prompts(model: Any, prompts: list[str]) -> list[str]:
    """``prompts`` as user turns in the model's chat template (unchanged without one)."""
    tokenizer = get_adapter(model).tokenizer
    return [chat_prompt(tokenizer, prompt) for prompt in prompts]
