"""Pictures of attribution: token-level HTML (colour = causal effect) and layer heatmaps.

The HTML view is a small self-contained file (no JavaScript, no network), so it opens anywhere
and can be linked from reports; :func:`circuitsvis_tokens` gives the same data as a circuitsvis
widget for notebooks.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from steerx_lens.atomic import write_text
from steerx_lens.attribution import LayerEffects, TokenEffects, UserAttribution
from steerx_lens.extras import require
from steerx_lens.figures import new_figure, save_png

COLOR_LIMIT = 4.0  # nats at which the colour saturates

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; }}
.item {{ margin: 0.6em 0; padding: 0.4em; border-bottom: 1px solid #ddd; line-height: 1.9; }}
.tok {{ white-space: pre-wrap; border-radius: 3px; padding: 1px 0; }}
.legend span {{ padding: 2px 6px; }}
</style></head><body>
<h2>{title}</h2>
<p>Colour = causal effect of the user's own history on each token of their text
(log p with the user's history − log p with other users' history, nats).
<span class="legend"><span style="background:{neg}">−{limit:g}</span>
<span style="background:#ffffff">0</span><span style="background:{pos}">+{limit:g}</span></span>
Hover a token for its value.</p>
{summary}
{items}
</body></html>
"""


def effect_color(effect: float, limit: float = COLOR_LIMIT) -> str:
    """White at 0, red for positive (preference-driven), blue for negative effects."""
    strength = max(-1.0, min(1.0, effect / limit))
    fade = int(255 * (1 - abs(strength)))
    return f"rgb(255,{fade},{fade})" if strength >= 0 else f"rgb({fade},{fade},255)"


def item_html(item: TokenEffects, limit: float = COLOR_LIMIT) -> str:
    """One history item as coloured token spans with the effect in a tooltip."""
    pieces = []
    for token, effect in zip(item.tokens, item.effects.tolist(), strict=True):
        pieces.append(
            f'<span class="tok" style="background:{effect_color(effect, limit)}" '
            f'title="{effect:+.2f}">{html.escape(token)}</span>'
        )
    return f'<div class="item"><b>item {item.item_index}</b>: {"".join(pieces)}</div>'


def attribution_html(attribution: UserAttribution, limit: float = COLOR_LIMIT) -> str:
    """A whole HTML page for one user: description, top spans, and every item's tokens."""
    summary = []
    if attribution.description:
        summary.append(f"<p><b>Description:</b> {html.escape(attribution.description)}</p>")
    if attribution.spans:
        rows = "".join(
            f"<li>{html.escape(span.text)} — score {span.score:.2f}, {span.count}×</li>"
            for span in attribution.spans[:10]
        )
        summary.append(f"<p><b>Top preference spans</b></p><ol>{rows}</ol>")
    return PAGE.format(
        title=html.escape(f"Token attribution: {attribution.user_id}"),
        neg=effect_color(-limit, limit),
        pos=effect_color(limit, limit),
        limit=limit,
        summary="\n".join(summary),
        items="\n".join(item_html(item, limit) for item in attribution.items),
    )


def save_attribution_html(attribution: UserAttribution, path: str | Path) -> Path:
    """Write :func:`attribution_html` to ``path`` atomically."""
    return write_text(path, attribution_html(attribution))


def save_layer_heatmap(effects: LayerEffects, path: str | Path, max_tokens: int = 80) -> Path:
    """A layers × tokens heatmap PNG of layer-resolved effects (diverging colours, 0 = white)."""
    values = effects.effects[:, :max_tokens].float()
    tokens = effects.tokens[:max_tokens]
    limit = max(float(values.abs().max()), 1e-6)
    fig = new_figure(max(6.0, 0.28 * len(tokens)), 0.25 * len(effects.layers) + 2)
    axis = fig.subplots()
    image = axis.imshow(values.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axis.set_xticks(
        range(len(tokens)), [t.replace("\n", "⏎") for t in tokens], rotation=90, fontsize=7
    )
    axis.set_yticks(
        range(len(effects.layers)), [str(layer) for layer in effects.layers], fontsize=7
    )
    axis.set_xlabel("token of the user's text")
    axis.set_ylabel("patched layer (resid_pre)")
    axis.set_title(f"Layer-resolved causal effects, {effects.user_id} item {effects.item_index}")
    fig.colorbar(image, ax=axis, label="effect (nats)")
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def circuitsvis_tokens(item: TokenEffects) -> Any:
    """The item's tokens coloured by effect as a circuitsvis widget (for notebooks)."""
    colored_tokens = require("circuitsvis.tokens", "circuitsvis_tokens").colored_tokens

    values: list[float] = item.effects.to(torch.float32).tolist()
    return colored_tokens(tokens=list(item.tokens), values=values)
