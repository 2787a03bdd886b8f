"""``report.md`` and plots for an evaluation run (readable without the code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerx_lens.atomic import write_text
from steerx_lens.evaluation.results import RunMetrics
from steerx_lens.evaluation.stats import SIGNIFICANCE
from steerx_lens.figures import new_figure, save_png
from steerx_lens.runs import user_file_names

METHOD_NOTES = {
    "none": "no steering",
    "shared": "mean of the *other* users' all-history vectors (generic-shift control)",
    "baseline": "the user's all-history vector (classic steering)",
    "steerx": "the user's SteerX vector (anchor + the construction's personal part)",
    "decomposed_baseline": "shared + SteerX's personal norm along (baseline − shared)",
    "random_swap": "SteerX with its selected tokens at random positions (same strength)",
    "description_swap": "SteerX built from another user's description (same strength)",
    "history_prompt": "the user's recent fit history in the prompt, no steering",
    "description_prompt": "the user's description in the prompt, no steering",
    "description_prompt_other": "another user's description in the prompt, no steering",
    "baseline_other": "other users' all-history vectors (personalization control)",
    "steerx_other": "other users' SteerX vectors (personalization control)",
}
TABLE_METRICS = ("nll", "nll_distinct", "nll_marker", "nll_pref", "rougeL", "bleu")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def comparison_row(c: Mapping[str, Any]) -> str:
    """One Markdown row: a vs b, metric, mean [CI], p, Holm p, users positive."""
    low, high = c["ci95"]
    survives = c["p_holm"] is not None and c["p_holm"] < SIGNIFICANCE
    return (
        f"| {c['a']} vs {c['b']} | {c['metric']} | {c['mean']:+.4f} | [{low:+.4f}, {high:+.4f}] "
        f"| {_p(c['wilcoxon_p'])} | {_p(c['p_holm'])}{' ✓' if survives else ''} "
        f"| {c.get('n_positive', '–')}/{c['n_users']} |"
    )


def plot_methods(metrics: RunMetrics, path: Path) -> Path:
    """Bar chart of mean NLL (all tokens and distinctive tokens) per method."""
    methods = [m for m in METHOD_NOTES if m in metrics.methods]
    figure = new_figure(12, 4.0)
    axes = figure.subplots(1, 2)
    for axis, key, title in (
        (axes[0], "nll", "held-out NLL, all tokens"),
        (axes[1], "nll_distinct", "held-out NLL, user-distinctive tokens"),
    ):
        values = [metrics.methods[m].get(key) for m in methods]
        shown = [(m, v) for m, v in zip(methods, values, strict=True) if v is not None]
        axis.bar([m for m, _ in shown], [v for _, v in shown], color="#4C72B0")
        axis.set_title(title + " (lower is better)", fontsize=9)
        axis.tick_params(axis="x", rotation=45, labelsize=7)
        if shown:
            low = min(v for _, v in shown)
            axis.set_ylim(low * 0.95, max(v for _, v in shown) * 1.02)
    figure.tight_layout()
    return save_png(figure, path)


def plot_margins(metrics: RunMetrics, path: Path) -> Path:
    """Per-user personalization margin NLL(X_other) − NLL(X) for baseline and SteerX."""
    users = metrics.per_user
    figure = new_figure(max(5, 0.6 * len(users) + 2), 3.6)
    axis = figure.subplots()
    width = 0.38
    for offset, mode in ((-width / 2, "baseline"), (width / 2, "steerx")):
        margins = []
        for user in users:
            scores = user.scores
            own, other = scores.get(mode, {}).get("nll"), scores.get(f"{mode}_other", {}).get("nll")
            margins.append(other - own if own is not None and other is not None else 0.0)
        axis.bar([i + offset for i in range(len(users))], margins, width, label=mode)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(
        range(len(users)), [u.user_id for u in users], rotation=45, ha="right", fontsize=7
    )
    axis.set_ylabel("NLL(other users' vectors) − NLL(own)")
    axis.set_title("Personalization margin per user (> 0: own vector fits better)", fontsize=10)
    axis.legend()
    figure.tight_layout()
    return save_png(figure, path)


def write_report(
    metrics: RunMetrics,
    out: str | Path,
    names: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md`` (primary comparison, the goal's comparisons Holm-adjusted among
    themselves, method table, every comparison with its Holm-adjusted p, the generation check,
    users) and its plots.

    ``names`` maps user ids to their file names (default: :func:`user_file_names` of the
    evaluated users); ``notes`` are lines about the run itself (e.g. how many users were
    reused), listed under the first paragraph.
    """
    out = Path(out)
    names = names or user_file_names([user.user_id for user in metrics.per_user])
    plot_methods(metrics, out / "methods.png")
    plot_margins(metrics, out / "margins.png")
    config = metrics.config
    cells = _cells_text(config.get("cells", {}))
    if config.get("pooled_runs"):
        cells = "; ".join(
            f"window {run['window']}: {_cells_text(run['cells'])}" for run in config["pooled_runs"]
        )
    lines = [
        "# SteerX evaluation report",
        "",
        f"Data: `{config.get('data', '?')}`, {len(metrics.per_user)} users, backbone "
        f"`{config['backbone']}`, site kind `{config['site_kind']}`. Cells: {cells}.",
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
        *_strength_lines(config.get("strength_choice")),
    ]
    primary = metrics.primary
    if primary is not None:
        low, high = primary["ci95"]
        verdict = (
            "survives the Holm correction"
            if primary["p_holm"] is not None and primary["p_holm"] < SIGNIFICANCE
            else "does not survive the Holm correction"
        )
        lines += [
            "## Primary comparison",
            "",
            f"SteerX vs the all-history baseline, all-token held-out NLL, paired over "
            f"{primary['n_users']} users: NLL(baseline) − NLL(SteerX) = **{primary['mean']:+.4f}** "
            f"nats/token (95% CI [{low:+.4f}, {high:+.4f}], two-level bootstrap), Wilcoxon p "
            f"{_p(primary['wilcoxon_p'])}, Holm-adjusted p {_p(primary['p_holm'])}: it {verdict}.",
            "",
        ]
    if metrics.goal:
        lines += [
            "## The goal's comparisons (confirmatory family)",
            "",
            "SteerX against the baseline of its backbone on all tokens, distinctive tokens and "
            "ROUGE-L, against no steering and against the two matched controls; `Holm p` adjusts "
            "over these alone (✓: < "
            f"{SIGNIFICANCE}), the table further down over every comparison.",
            "",
            "| comparison | metric | mean | 95% CI | Wilcoxon p | Holm p | users positive |",
            "|---|---|---|---|---|---|---|",
            *(comparison_row({**c, "p_holm": c["p_holm_goal"]}) for c in metrics.goal),
            "",
        ]
    lines += [
        "## Methods",
        "",
        "Means over users. **nll**: all held-out tokens (nats/token, lower is better). "
        "**nll_distinct**: tokens of words/bigrams distinctive of the user's fit history by a "
        "model-free log-odds statistic. **nll_marker**: planted markers (synthetic users). "
        "**nll_pref**: tokens the patching estimator marks (estimator-defined, secondary: the "
        "same estimator selects SteerX's tokens). ROUGE-L/BLEU: generations for the task "
        "prompts, echo excluded. `norm`: ‖α·v‖ / median residual norm.",
        "",
        "| method | what it is | " + " | ".join(TABLE_METRICS) + " | norm |",
        "|---|---|" + "---|" * (len(TABLE_METRICS) + 1),
    ]
    for method, note in METHOD_NOTES.items():
        values = metrics.methods.get(method)
        if values is None:
            continue
        cells_text = " | ".join(
            _fmt(values.get(m), 3 if m.startswith("nll") else 1) for m in TABLE_METRICS
        )
        lines.append(
            f"| `{method}` | {note} | {cells_text} | {_fmt(values.get('steering_norm'))} |"
        )
    check = metrics.generation_check
    if check is not None:
        lines += ["", f"Generation check: {check['message']}."]
    lines += [
        "",
        "![NLL per method](methods.png)",
        "",
        "## Paired comparisons over users",
        "",
        "Mean over users of per-user differences, positive = the first method is better. 95% CI "
        "from a two-level bootstrap (users, then items within users); p from the Wilcoxon "
        "signed-rank test over users; Holm-adjusted over every comparison in this table "
        f"(✓: Holm p < {SIGNIFICANCE}).",
        "",
        "| comparison | metric | mean | 95% CI | Wilcoxon p | Holm p | users positive |",
        "|---|---|---|---|---|---|---|",
        *(comparison_row(c) for c in metrics.comparisons),
        "",
        "![Personalization margin per user](margins.png)",
        "",
        "## Users",
        "",
    ]
    for user in metrics.per_user:
        spans = ", ".join(f"“{s.text.strip()}”" for s in user.top_spans[:6]) or "none"
        name = names[user.user_id]
        nll = {method: scores.get("nll") for method, scores in user.scores.items()}
        masks = ", ".join(f"{m} {n}" for m, n in user.mask_tokens.items())
        lines += [
            f"### {user.user_id}",
            "",
            f"- Description: {user.description}",
            f"- Top preference spans: {spans}",
            f"- Held-out tokens: {user.n_heldout_tokens} ({masks}); tokens swapped in minimal "
            f"pairs: {user.n_swapped_tokens}"
            + (" (no personal component: SteerX = shared vector)" if user.steerx_fallback else ""),
            "- NLL "
            + " / ".join(
                f"{m} {_fmt(nll.get(m))}" for m in ("none", "shared", "baseline", "steerx")
            ),
            *(  # a pooled report has no views of its own
                [f"- [Token attribution view](attribution/{name}.html)"]
                if (out / "attribution" / f"{name}.html").exists()
                else []
            ),
            "",
        ]
    if metrics.failures:
        lines += ["## Users not evaluated", ""]
        lines += [f"- {uid}: {why}" for uid, why in metrics.failures.items()]
    if metrics.skipped_items:
        lines += ["", "## Items not used", ""]
        lines += [f"- {why}" for reasons in metrics.skipped_items.values() for why in reasons]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def _cells_text(cells: Mapping[str, Mapping[str, Any]]) -> str:
    """``method L<layer> α<alpha> [r<r>]`` per method."""
    return ", ".join(
        f"{m} L{c['layer']} α{c['alpha']:g}" + (f" r{c['r']:g}" if "r" in c else "")
        for m, c in cells.items()
    )


def _strength_lines(choice: dict[str, Any] | None) -> list[str]:
    """How each method's strength was chosen on validation items (nothing when it was not)."""
    if choice is None:
        return []
    if not choice["methods"]:
        return ["Strengths: no user has validation items, so every method keeps its cell.", ""]
    rows = [
        f"| `{method}` | "
        + "; ".join(
            f"α {a:g}: {c:+.4f}"
            for a, c in zip(entry["candidates"], entry["validation_nll_change"], strict=True)
        )
        + f" | **{entry['alpha']:g}** |"
        for method, entry in choice["methods"].items()
    ]
    return [
        "## Strengths chosen on validation items",
        "",
        f"Each method's α is the candidate with the lowest mean NLL change against no steering "
        f"on the validation items of {choice['n_users']} users (α 0: not applied).",
        "",
        "| method | validation NLL change per candidate | chosen α |",
        "|---|---|---|",
        *rows,
        "",
    ]
