"""MkDocs hook: fill generated sections of the docs at build time.

- ``<!-- steerx-cli-reference -->`` in ``cli.md`` becomes the reference of every ``steerx``
  subcommand, read from the Typer app itself (so it cannot drift from ``steerx <cmd> --help``);
- ``<!-- steerx-benchmark-results -->`` in ``benchmarks.md`` becomes the content of every
  ``benchmarks/results/*.md`` file (headings demoted), or a note when there is none yet;
- Sphinx roles left in docstrings (``:class:`Steer```, ``:func:`~pkg.mod.f```) are rendered as
  plain code (``Steer``, ``f``) in the API pages instead of showing the role.

Registered in ``mkdocs.yml`` under ``hooks:``; ``docs/_hooks/`` is excluded from the site.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CLI_MARKER = "<!-- steerx-cli-reference -->"
BENCHMARK_MARKER = "<!-- steerx-benchmark-results -->"
REPO_ROOT = Path(__file__).resolve().parents[2]
SPHINX_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|data|mod|attr|exc|obj|const):<code>(~?)([^<]*)</code>"
)


def _cell(text: str) -> str:
    """Escape a string for a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def cli_reference() -> str:
    """Markdown for every subcommand of the ``steerx`` Typer app: usage, help, options table."""
    import typer

    from steerx_lens.cli import app

    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="steerx")
    lines: list[str] = []
    for name, command in group.commands.items():
        ctx = command.context_class(command, info_name=name, parent=root)
        lines += [f"## `steerx {name}`", "", (command.help or "").strip(), ""]
        lines += ["```text", f"steerx {name} [OPTIONS]", "```", ""]
        records = []
        for param in command.params:
            record = param.get_help_record(ctx)
            if record is None:
                continue
            required = "yes" if getattr(param, "required", False) else ""
            records.append((record[0], record[1] or "", required))
        records.append(("--help", "Show the help text and exit.", ""))
        lines += ["| option | meaning [default] | required |", "|---|---|:---:|"]
        for option, meaning, required in records:
            lines.append(f"| `{_cell(option)}` | {_cell(meaning)} | {required} |")
        lines.append("")
    return "\n".join(lines)


def benchmark_results() -> str:
    """The result files of ``benchmarks/results/`` with their headings demoted two levels."""
    files = sorted((REPO_ROOT / "benchmarks" / "results").glob("*.md"))
    if not files:
        return "*No benchmark results have been written yet: run the scripts above.*\n"
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text, flags=re.M)
        parts.append(f"*From `benchmarks/results/{path.name}`:*\n\n{text.strip()}\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the markers with the generated sections."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if BENCHMARK_MARKER in markdown:
        markdown = markdown.replace(BENCHMARK_MARKER, benchmark_results())
    return markdown


def _strip_role(match: re.Match[str]) -> str:
    """``:class:`~a.b.C``` as ``C``, ``:func:`a.f``` as ``a.f`` (Sphinx's display rules)."""
    tilde, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Render the Sphinx roles of docstrings as plain inline code."""
    return SPHINX_ROLE.sub(_strip_role, html)
