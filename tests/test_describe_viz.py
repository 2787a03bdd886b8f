"""Descriptions (stage 3) and attribution pictures, on hand-made attributions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerx_lens.attribution import LayerEffects, Span, TokenEffects, UserAttribution
from steerx_lens.describe import (
    EMPTY_DESCRIPTION,
    LLMDescriber,
    StructuredDescriber,
    TemplateDescriber,
    describe,
    description_quality,
    evidence_lines,
    first_sentences,
)
from steerx_lens.models import load_tiny_model
from steerx_lens.viz import (
    attribution_html,
    circuitsvis_tokens,
    effect_color,
    save_attribution_html,
    save_layer_heatmap,
)


def item(index: int, tokens: list[str], effects: list[float]) -> TokenEffects:
    values = torch.tensor(effects)
    return TokenEffects("u1", index, tokens, torch.arange(len(tokens)), values, values, 0 * values)


def attribution() -> UserAttribution:
    items = [
        item(
            0, ["Great", " beer", ".", " Cheers", ",", " Sam", "!"], [0.1, 0, 0, 9.0, 2.0, 5.0, 1.0]
        ),
        item(
            1,
            ["Sleep", " <well>", ".", " Cheers", ",", " Sam", "!"],
            [0, 0.2, 0, 8.0, 1.5, 4.0, 1.0],
        ),
    ]
    spans = [Span(" Cheers, Sam!", 6.0, 2), Span("splendid", 1.0, 1)]
    return UserAttribution("u1", items, spans)


def test_template_describer_is_deterministic_and_lists_spans() -> None:
    text = TemplateDescriber()(attribution())
    assert text == TemplateDescriber()(attribution())
    assert '"Cheers, Sam!"' in text and '"splendid"' in text
    assert TemplateDescriber()(UserAttribution("u", [], [])) == EMPTY_DESCRIPTION


def test_llm_describer_prompt_carries_spans_and_snippets() -> None:
    prompts: list[str] = []

    def fake_llm(prompt: str) -> str:
        prompts.append(prompt)
        return "Signs off warmly as Sam. Likes beer. Third sentence. Fourth sentence."

    result = describe(attribution(), LLMDescriber(fake_llm))
    assert result.description == "Signs off warmly as Sam. Likes beer. Third sentence."
    assert '"Cheers, Sam!" (used 2 times): "Great beer. Cheers, Sam!"' in prompts[0]
    assert evidence_lines(attribution())[1] == '- "splendid" (used 1 times)'  # no occurrence


def test_llm_describer_falls_back_to_template_on_empty_answer() -> None:
    text = LLMDescriber(lambda prompt: "   ")(attribution())
    assert text == TemplateDescriber()(attribution())


def test_llm_describer_runs_a_real_model() -> None:
    model = load_tiny_model("hf")
    describer = LLMDescriber(model, max_new_tokens=8)
    text = describer(attribution())
    assert isinstance(text, str) and text  # a random model still writes something
    assert "Cheers, Sam!" in describer.prompt(attribution())


def test_first_sentences() -> None:
    assert first_sentences("A b.  C d!\nE f? G.", 2) == "A b. C d!"


def test_html_view_colours_and_escapes_tokens(tmp_path: Path) -> None:
    page = attribution_html(describe(attribution(), TemplateDescriber()))
    assert "&lt;well&gt;" in page and "<well>" not in page
    assert f'background:{effect_color(9.0)}" title="+9.00"> Cheers' in page
    assert effect_color(9.0) == "rgb(255,0,0)" and effect_color(-9.0) == "rgb(0,0,255)"
    assert effect_color(0.0) == "rgb(255,255,255)"
    assert "recurring personal expressions" in page
    path = save_attribution_html(attribution(), tmp_path / "u1.html")
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_layer_heatmap_png(tmp_path: Path) -> None:
    effects = LayerEffects(
        "u1", 0, [0, 4, 8], ["a", " b", "\n"], torch.arange(3), torch.randn(3, 3)
    )
    path = save_layer_heatmap(effects, tmp_path / "layers.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]


def test_circuitsvis_widget_has_the_tokens() -> None:
    widget = circuitsvis_tokens(attribution().items[0])
    assert "Cheers" in str(widget)


def other_attribution() -> UserAttribution:
    items = [
        item(0, ["RT", " @KHNews", ":", " Study", ":", " sleep", "?"], [0, 5.0, 0, 3.0, 1, 0, 0]),
        item(1, ["Study", ":", " #sleep", " helps", " @KHNews", "?"], [3.0, 1, 4.0, 0, 5.0, 0]),
    ]
    spans = [Span("@KHNews", 5.0, 2), Span("#sleep", 4.0, 1), Span("Study:", 3.0, 2)]
    return UserAttribution("u2", items, spans)


def test_structured_describer_groups_spans_by_kind_with_measured_habits() -> None:
    text = StructuredDescriber()(other_attribution())
    assert text == StructuredDescriber()(other_attribution())
    assert "accounts such as @KHNews" in text
    assert "hashtags such as #sleep" in text
    assert 'Favoured words: "Study:"' in text or "Recurring phrases" not in text
    assert "They ask questions (100% of texts)." in text
    assert "They often open with a colon lead-in (100% of texts)." in text
    assert "Their texts are typically" in text
    assert 'Recurring phrases: "Cheers, Sam!"' in StructuredDescriber()(attribution())
    assert StructuredDescriber()(UserAttribution("u", [], [])) == EMPTY_DESCRIPTION


def test_description_quality_separates_own_from_other_and_catches_invented_claims() -> None:
    spoken = attribution()
    spoken.spans = spoken.spans[:1]  # "splendid" is not in the fixture's texts
    atts = {"u1": spoken, "u2": other_attribution()}
    own = {u: StructuredDescriber()(a) for u, a in atts.items()}
    quality = description_quality(own, atts)
    assert quality.faithfulness == 1.0
    assert quality.own_spans_named > quality.other_spans_named
    swapped = {"u1": own["u2"], "u2": own["u1"]}
    crossed = description_quality(swapped, atts)
    assert crossed.own_spans_named < crossed.other_spans_named
    assert crossed.faithfulness is not None and crossed.faithfulness < 1.0
    invented = {**own, "u1": own["u1"] + ' They love "sunny beaches" and #surfing.'}
    assert description_quality(invented, atts).faithfulness < 1.0
    with pytest.raises(ValueError, match="two users"):
        description_quality({"u1": own["u1"]}, atts)
