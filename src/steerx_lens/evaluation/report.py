"""``report.md`` and plots for an evaluation run (readable without the code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from steerx_lens.atomic import write_text
from steerx_lens.evaluation.results import PairedStats, RunMetrics
from steerx_lens.figures import new_figure, save_png
from steerx_lens.runs import user_file_names

METHOD_NOTES = {
    "none": "no steering",
    "history_prompt": "the user's recent history in the prompt, no steering",
    "baseline": "the user's all-history vector (classic steering)",
    "steerx": "the user's SteerX vector (shared + personal minimal-pair part)",
    "shared": "one population-mean vector for every user (generic-shift control)",
    "baseline_other": "other users' all-history vectors (personalization control)",
    "steerx_other": "other users' SteerX vectors (personalization control)",
}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _stat_row(name: str, stat: PairedStats | None) -> str:
    if stat is None:
        return f"| {name} | – | – | – | – |"
    p = "–" if stat.wilcoxon_p is None else f"{stat.wilcoxon_p:.3g}"
    return (
        f"| {name} | {stat.mean:+.4f} | [{stat.ci_low:+.4f}, {stat.ci_high:+.4f}] | {p} | "
        f"{stat.n_positive}/{stat.n} |"
    )


def plot_methods(metrics: RunMetrics, path: Path) -> Path:
    """Bar chart of mean NLL and preference-token NLL per method."""
    methods = [m for m in METHOD_NOTES if m in metrics.methods]
    figure = new_figure(11, 3.8)
    axes = figure.subplots(1, 2)
    for axis, key, title in (
        (axes[0], "nll", "held-out NLL, all tokens"),
        (axes[1], "nll_pref", "held-out NLL, preference-bearing tokens"),
    ):
        values = [metrics.methods[m].get(key) for m in methods]
        shown = [(m, v) for m, v in zip(methods, values, strict=True) if v is not None]
        axis.bar([m for m, _ in shown], [v for _, v in shown], color="#4C72B0")
        axis.set_title(title + " (lower is better)")
        axis.tick_params(axis="x", rotation=35)
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
        margins = [
            (u.scores[f"{mode}_other"].nll - u.scores[mode].nll)  # type: ignore[operator]
            if f"{mode}_other" in u.scores
            else 0.0
            for u in users
        ]
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
    """Write ``report.md`` (tables, paired statistics, descriptions, links) and its plots.

    ``names`` maps user ids to their file names (default: :func:`user_file_names` of the
    evaluated users); ``notes`` are lines about the run itself (e.g. how many users were
    reused), listed under the first paragraph.
    """
    out = Path(out)
    names = names or user_file_names([user.user_id for user in metrics.per_user])
    plot_methods(metrics, out / "methods.png")
    plot_margins(metrics, out / "margins.png")
    config = metrics.config
    lines = [
        "# SteerX evaluation report",
        "",
        f"Data: `{config.get('data', '?')}`, {len(metrics.per_user)} users, site "
        f"`blocks.{config['layer']}.{config['site_kind']}`, backbone `{config['backbone']}`, "
        f"alpha {config['alpha']}, r {config['r']}.",
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
        "Each user's held-out texts are scored under every method. **NLL** is the mean "
        "negative log-likelihood per token of the user's real text (nats, lower is better). "
        "**NLL pref** counts only the *preference-bearing* tokens: those whose probability "
        "rises by more than 1 nat when the model sees this user's own history instead of other "
        "users' (activation patching). ROUGE/BLEU compare greedy generations with the user's text.",
        "",
        "| method | what it is | NLL | NLL pref | ROUGE-1 | ROUGE-L | BLEU |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, note in METHOD_NOTES.items():
        values = metrics.methods.get(method)
        if values is None:
            continue
        lines.append(
            f"| `{method}` | {note} | {_fmt(values.get('nll'))} | {_fmt(values.get('nll_pref'))} | "
            f"{_fmt(values.get('rouge1'), 1)} | {_fmt(values.get('rougeL'), 1)} | {_fmt(values.get('bleu'), 1)} |"
        )
    lines += [
        "",
        "![NLL per method](methods.png)",
        "",
        "## Paired statistics over users",
        "",
        "Differences are computed per user, then averaged; 95% CI by bootstrap over users; p from "
        "the Wilcoxon signed-rank test. Positive = the second method is better (lower NLL).",
        "",
        "| comparison | mean | 95% CI | Wilcoxon p | users positive |",
        "|---|---|---|---|---|",
    ]
    stats = metrics.stats
    for mode in ("baseline", "steerx"):
        for metric in ("nll", "nll_pref"):
            lines.append(
                _stat_row(
                    f"personalization margin, {mode}, {metric}",
                    stats.personalization_margin[mode][metric],
                )
            )
    for reference in ("none", "shared", "baseline"):
        for mode, by_metric in stats.gain_over[reference].items():
            for metric in ("nll", "nll_pref"):
                lines.append(_stat_row(f"{mode} vs {reference}, {metric}", by_metric[metric]))
    lines += ["", "![Personalization margin per user](margins.png)", "", "## Users", ""]
    for user in metrics.per_user:
        spans = ", ".join(f"“{s.text.strip()}”" for s in user.top_spans[:6]) or "none"
        name = names[user.user_id]
        nll = {method: scores.nll for method, scores in user.scores.items()}
        lines += [
            f"### {user.user_id}",
            "",
            f"- Description: {user.description}",
            f"- Top preference spans: {spans}",
            f"- Preference-bearing held-out tokens: {user.n_pref_tokens} of {user.n_heldout_tokens}; "
            f"tokens swapped in minimal pairs: {user.n_swapped_tokens}"
            + (" (no personal component: SteerX = shared vector)" if user.steerx_fallback else ""),
            f"- NLL none / shared / baseline / SteerX: {_fmt(nll['none'])} / "
            f"{_fmt(nll['shared'])} / {_fmt(nll['baseline'])} / {_fmt(nll['steerx'])}",
            f"- [Token attribution view](attribution/{name}.html)",
            "",
        ]
    if metrics.failures:
        lines += ["## Users not evaluated", ""]
        lines += [f"- {uid}: {why}" for uid, why in metrics.failures.items()]
    if metrics.skipped_items:
        lines += ["", "## Items not used", ""]
        lines += [f"- {why}" for reasons in metrics.skipped_items.values() for why in reasons]
    return write_text(out / "report.md", "\n".join(lines) + "\n")
