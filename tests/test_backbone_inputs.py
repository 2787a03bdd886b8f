"""Backbones read plain strings, (prompt, response) tuples, history items, samples and token ids.

Each form must give the same vector as its equivalent encoded form (bit for bit), existing
inputs must give the same numbers as before, and anything else is a one-line InputTypeError.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerx_lens import hooks
from steerx_lens.backbones import BACKBONES, Sample, as_encoded, as_samples, encode_text
from steerx_lens.backbones.bipo import BiPOConfig, PreferencePair, bipo_backbone, train_bipo
from steerx_lens.backbones.mean_diff import (
    mean_diff_backbone,
    mean_diff_vector,
    pooled_activations,
    residual_norm,
)
from steerx_lens.backbones.sae import sae_backbone
from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem
from steerx_lens.errors import InputTypeError, SteerXError
from steerx_lens.models import load_tiny_model
from steerx_lens.text import EncodedText, build_prompt, encode_item, pad_batch

SITE = "blocks.1.hook_resid_post"
GOOD = ["Cheers, Sam! I love hoppy beers.", "Hops, hops and more hops, Sam."]
BAD = ["Health news: sleep well tonight.", "The weather is grey and wet."]
PAIRS_GOOD = [("What do you drink?", GOOD[0]), ("Favourite taste?", GOOD[1])]
PAIRS_BAD = [("What do you drink?", BAD[0]), ("Favourite taste?", BAD[1])]


@pytest.fixture(scope="module")
def model() -> Any:
    torch.set_num_threads(1)
    return load_tiny_model("hf")


@pytest.fixture(scope="module")
def tokenizer(model: Any) -> Any:
    return get_adapter(model).tokenizer


def whole(tokenizer: Any, text: str) -> EncodedText:
    """A whole text as hooks.run tokenizes it, every token after the first as response."""
    return EncodedText(list(tokenizer(text)["input_ids"]), response_start=1)


def items(pairs: list[tuple[str, str]]) -> list[HistoryItem]:
    return [HistoryItem(prompt, response) for prompt, response in pairs]


def reference_mean_diff(
    model: Any, good: list[EncodedText], bad: list[EncodedText]
) -> torch.Tensor:
    """The mean difference written out (one padded batch per side), independent of the code."""

    def pooled(texts: list[EncodedText]) -> torch.Tensor:
        inputs, response, _ = pad_batch(texts, get_adapter(model).pad_token_id)
        act = hooks.activations(model, inputs, [SITE])[SITE].float()
        weights = response.unsqueeze(-1).float()
        return ((act * weights).sum(1) / weights.sum(1)).mean(0)

    return pooled(good) - pooled(bad)


# ------------------------------------------------------------------------------ normalising


def test_each_form_normalises_to_its_equivalent(tokenizer: Any) -> None:
    text = GOOD[0]
    assert encode_text(tokenizer, text) == whole(tokenizer, text)
    (sample,) = as_samples(tokenizer, [text])
    assert sample.exact_tokens and sample.tokens == whole(tokenizer, text)
    item = HistoryItem(*PAIRS_GOOD[0])
    assert as_samples(tokenizer, [PAIRS_GOOD[0]]) == [Sample(item)]
    assert as_samples(tokenizer, [item]) == [Sample(item)]
    pinned = Sample(item, encode_item(tokenizer, item))
    assert as_samples(tokenizer, [pinned])[0] is pinned
    encoded = encode_item(tokenizer, item)
    assert as_encoded(tokenizer, [encoded])[0] is encoded
    assert as_encoded(tokenizer, [PAIRS_GOOD[0], item, Sample(item)]) == [encoded] * 3
    assert as_encoded(tokenizer, text) == [whole(tokenizer, text)]  # one bare string = one text


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"input": "a", "output": "b"}, "dict"),
        (3, "int"),
        (("a", "b", "c"), "tuple"),
        (("a", 2), "tuple"),
        (["prompt", "response"], "list"),
        (None, "NoneType"),
    ],
)
def test_other_types_raise_a_named_one_line_error(model: Any, bad: Any, expected: str) -> None:
    with pytest.raises(InputTypeError, match=expected) as error:
        mean_diff_vector(model, SITE, [GOOD[0], bad], BAD)
    message = str(error.value)
    assert "\n" not in message and "(prompt, response)" in message and "positives[1]" in message
    assert isinstance(error.value, SteerXError) and isinstance(error.value, TypeError)
    with pytest.raises(InputTypeError, match=r"chosen\[0\]"):
        mean_diff_backbone(model, SITE, [bad], BAD[:1])
    with pytest.raises(InputTypeError):
        mean_diff_vector(model, SITE, 12, BAD)  # not a sequence at all


def test_a_one_token_text_says_what_to_pass(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="at least two"):
        encode_text(tokenizer, "a")


# ------------------------------------------------------------------------------ mean_diff


def test_strings_give_the_vector_of_their_tokens(model: Any, tokenizer: Any) -> None:
    """The failure this fixes: mean_diff_vector(model, site, ["text"], ...) on strings."""
    from_strings = mean_diff_vector(model, SITE, GOOD, BAD)
    encoded = mean_diff_vector(
        model, SITE, [whole(tokenizer, t) for t in GOOD], [whole(tokenizer, t) for t in BAD]
    )
    assert torch.equal(from_strings, encoded)
    reference = reference_mean_diff(
        model, [whole(tokenizer, t) for t in GOOD], [whole(tokenizer, t) for t in BAD]
    )
    assert torch.allclose(from_strings, reference, atol=1e-6)
    assert from_strings.norm() > 0
    assert torch.equal(mean_diff_backbone(model, SITE, GOOD, BAD), from_strings)
    assert torch.equal(
        pooled_activations(model, SITE, GOOD),
        pooled_activations(model, SITE, [whole(tokenizer, t) for t in GOOD]),
    )
    assert residual_norm(model, SITE, GOOD) == residual_norm(
        model, SITE, [whole(tokenizer, t) for t in GOOD]
    )


def test_pairs_items_and_samples_give_the_same_vector(model: Any, tokenizer: Any) -> None:
    samples = [Sample(i) for i in items(PAIRS_GOOD)], [Sample(i) for i in items(PAIRS_BAD)]
    before = mean_diff_backbone(model, SITE, *samples)  # the pipeline's form
    reference = reference_mean_diff(
        model,
        [encode_item(tokenizer, i) for i in items(PAIRS_GOOD)],
        [encode_item(tokenizer, i) for i in items(PAIRS_BAD)],
    )
    assert torch.allclose(before, reference, atol=1e-6)  # existing inputs: same numbers
    assert torch.equal(mean_diff_backbone(model, SITE, PAIRS_GOOD, PAIRS_BAD), before)
    assert torch.equal(mean_diff_vector(model, SITE, PAIRS_GOOD, PAIRS_BAD), before)
    assert torch.equal(mean_diff_vector(model, SITE, items(PAIRS_GOOD), items(PAIRS_BAD)), before)
    assert not torch.allclose(mean_diff_vector(model, SITE, GOOD, BAD), before)
    mixed = mean_diff_backbone(model, SITE, [PAIRS_GOOD[0], GOOD[1]], [*items(PAIRS_BAD)])
    assert torch.isfinite(mixed).all()


# ------------------------------------------------------------------------------ bipo


def test_bipo_reads_every_form(model: Any, tokenizer: Any) -> None:
    options = {"steps": 3, "seed": 1}
    samples = [Sample(i) for i in items(PAIRS_GOOD)], [Sample(i) for i in items(PAIRS_BAD)]
    before = bipo_backbone(model, SITE, *samples, **options)
    pairs = [
        PreferencePair(build_prompt(tokenizer, p), good, bad)
        for (p, good), (_, bad) in zip(PAIRS_GOOD, PAIRS_BAD, strict=True)
    ]
    config = BiPOConfig(steps=3, seed=1)
    assert torch.equal(before, train_bipo(model, SITE, pairs, config, progress=False).vector)
    assert torch.equal(bipo_backbone(model, SITE, PAIRS_GOOD, PAIRS_BAD, **options), before)
    from_strings = bipo_backbone(model, SITE, GOOD, BAD, **options)
    encoded = bipo_backbone(
        model,
        SITE,
        [whole(tokenizer, t) for t in GOOD],
        [whole(tokenizer, t) for t in BAD],
        **options,
    )
    assert torch.equal(from_strings, encoded)
    assert from_strings.norm() > 0 and not torch.allclose(from_strings, before)
    with pytest.raises(ValueError, match="2 chosen and 1 rejected"):
        bipo_backbone(model, SITE, GOOD, BAD[:1], **options)


# ------------------------------------------------------------------------------ sae


def test_sae_backbone_reads_every_form(model: Any, tokenizer: Any) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.StandardSAEConfig(d_in=64, d_sae=128)
    cfg.metadata.hook_name = SITE
    torch.manual_seed(0)
    sae = sae_lens.StandardSAE(cfg)
    options = {"sae": sae, "sae_k": 8}
    from_strings = sae_backbone(model, SITE, GOOD, BAD, **options)
    encoded = sae_backbone(
        model,
        SITE,
        [whole(tokenizer, t) for t in GOOD],
        [whole(tokenizer, t) for t in BAD],
        **options,
    )
    assert torch.equal(from_strings, encoded) and from_strings.norm() > 0
    samples = [Sample(i) for i in items(PAIRS_GOOD)], [Sample(i) for i in items(PAIRS_BAD)]
    before = sae_backbone(model, SITE, *samples, **options)
    assert torch.equal(sae_backbone(model, SITE, PAIRS_GOOD, PAIRS_BAD, **options), before)
    assert torch.equal(
        BACKBONES["sae"](model, SITE, items(PAIRS_GOOD), items(PAIRS_BAD), **options), before
    )
