"""Descriptions (stage 3) and attribution pictures, on hand-made attributions."""

from __future__ import annotations

from pathlib import Path

import torch

from steerx_lens.attribution import LayerEffects, Span, TokenEffects, UserAttribution
from steerx_lens.describe import (
    EMPTY_DESCRIPTION,
    LLMDescriber,
    TemplateDescriber,
    describe,
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
