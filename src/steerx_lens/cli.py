"""The ``steerx`` command line.

Every option is checked before any model is loaded (choices, ranges, finite numbers, files),
with a one-line error that names the option (exit status 2). A library error during a run is
one line too (exit status 1); ``steerx --debug <command>`` shows its traceback instead. Each
command that writes holds its ``--out`` folder (:func:`steerx_lens.runs.out_lock`): a second
run into the same folder is refused at once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from steerx_lens import hooks
from steerx_lens.atomic import write_text
from steerx_lens.backends import REGISTRY, get_adapter
from steerx_lens.demo import DEMO_PROMPTS, chat_prompts, contrast_vector
from steerx_lens.errors import DataError, SteerXError
from steerx_lens.evaluation.cells import DEFAULT_ALPHA_CANDIDATES
from steerx_lens.models import load_demo_model, load_model_dir, load_tiny_model
from steerx_lens.runs import out_lock, user_file_names, write_name_index

if TYPE_CHECKING:
    from steerx_lens.data import UserHistory
    from steerx_lens.describe import DescriptionQuality
    from steerx_lens.evaluation.results import RunMetrics

LIBRARY_ERRORS = (SteerXError, ValueError, OSError)
"""Errors shown as one line (the input, a file or the run's data is wrong, not steerx_lens)."""
REMOTES = ("off", "local", "ndif")
LAYER_HELP = "layer whose resid_post is steered (default: 40% of the depth, 12 on the demo model)"
REMOTE_HELP = "off | local (nnsight's offline simulation of NDIF) | ndif (needs NDIF_API_KEY) | URL"
MODEL_HELP = "a local model folder, or with --remote ndif a hub id (default: the demo model)"


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class _Failed(typer.TyperException):
    """A library error raised by a command, shown as one line with exit status 1."""

    exit_code = 1


class _Commands(TyperGroup):
    """The app's commands: every error is one line on stderr (``--debug``: the traceback)."""

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a library error becomes :class:`_Failed` unless ``--debug``."""
        try:
            return super().invoke(ctx)
        except LIBRARY_ERRORS as error:
            if ctx.params.get("debug"):
                raise
            kind = "" if isinstance(error, SteerXError) else f"{type(error).__name__}: "
            raise _Failed(f"{kind}{error}" or type(error).__name__) from error

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Click's ``main``, but usage and library errors print as ``error: <one line>``."""
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as error:
            if not standalone_mode:
                raise
            typer.echo(f"error: {_one_line(error.format_message())}", err=True)
            code = error.exit_code
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("error: aborted", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


# ---------------------------------------------------------------------------- option checks
def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _non_negative(value: float | None) -> float | None:
    if _finite(value) is not None and value < 0:  # type: ignore[operator]
        raise typer.BadParameter(f"must be at least 0, got {value}")
    return value


def _floats(text: str, minimum: float | None = None) -> list[float]:
    """A comma list of finite numbers (each at least ``minimum``); ``ValueError`` otherwise."""
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError("give at least one number")
    bad = [v for v in values if not math.isfinite(v) or (minimum is not None and v < minimum)]
    if bad:
        bound = "finite" if minimum is None else f"finite and at least {minimum:g}"
        raise ValueError(f"every value must be {bound}, got {bad[0]}")
    return values


def _alphas(text: str) -> str:
    try:
        _floats(text)
    except ValueError as error:
        raise typer.BadParameter(f"{text!r}: {error}") from None
    return text


def _rs(text: str) -> str:
    try:
        _floats(text, minimum=0.0)
    except ValueError as error:
        raise typer.BadParameter(f"{text!r}: {error}") from None
    return text


def _layers(text: str) -> str:
    from steerx_lens.sweep import parse_layers

    try:
        layers = parse_layers(text)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(
            f"{text!r} is not start:stop:step or a comma list ({error})"
        ) from None
    if not layers or min(layers) < 0:
        raise typer.BadParameter(f"{text!r} gives no layer, or a negative one: {layers}")
    return text


def _data(value: str) -> str:
    from steerx_lens.data import SOURCES

    if value not in SOURCES and not Path(value).is_file():
        raise typer.BadParameter(f"no file {value!r}, and not a built-in source {tuple(SOURCES)}")
    return value


def _out(value: Path) -> Path:
    if value.exists() and not value.is_dir():
        raise typer.BadParameter(f"{value} exists and is not a folder")
    return value


def _backend(value: str) -> str:
    if value not in REGISTRY:
        raise typer.BadParameter(f"unknown backend {value!r}; choose one of {tuple(REGISTRY)}")
    return value


def _remote(value: str) -> str:
    if value not in REMOTES and not value.startswith(("http://", "https://")):
        raise typer.BadParameter(f"must be off, local, ndif or an http(s) host, got {value!r}")
    return value


def _backbone(value: str) -> str:
    from steerx_lens.backbones import BACKBONES

    if value not in BACKBONES:
        raise typer.BadParameter(f"unknown backbone {value!r}; choose one of {tuple(BACKBONES)}")
    return value


def load_population(
    data: str, users: int | None, max_history: int | None, window: int = 0
) -> list[UserHistory]:
    """The users of ``--data``: the first ``--users``, from time window ``--window``, each
    keeping its last ``--max-history`` history items."""
    import inspect
    from dataclasses import replace

    from steerx_lens.data import SOURCES, load_users

    options: dict[str, int] = {}
    if window:
        loader = SOURCES.get(data)
        if loader is None or "window" not in inspect.signature(loader).parameters:
            raise typer.BadParameter(
                f"{data!r} has no time windows (health_tweets and news_outlets do)",
                param_hint="'--window'",
            )
        options["window"] = window
    population = load_users(data, n_users=users, **options)
    if max_history is not None:
        population = [replace(u, history=u.history[-max_history:]) for u in population]
    return population


def check_model_options(backend: str, remote: str, source: str | None) -> None:
    """The checks of ``--backend``, ``--remote`` and ``--model`` together (before loading)."""
    if remote != "off" and backend != "nnsight":
        raise typer.BadParameter("--remote runs through nnsight: add --backend nnsight")
    if remote in ("off", "local"):
        if source is not None and not Path(source).is_dir():
            raise typer.BadParameter(f"no model folder {source!r}", param_hint="'--model'")
    elif source is None:
        raise typer.BadParameter(f"--remote {remote} needs --model ORG/NAME (hosted on NDIF)")


# Options shared by several commands.
BackendOption = Annotated[str, typer.Option(help=f"one of {tuple(REGISTRY)}", callback=_backend)]
RemoteOption = Annotated[str, typer.Option(help=REMOTE_HELP, callback=_remote)]
ModelOption = Annotated[str | None, typer.Option("--model", help=MODEL_HELP)]
TinyOption = Annotated[bool, typer.Option(help="use the tiny random model (smoke test)")]
UsersOption = Annotated[int | None, typer.Option(min=1, help="only the first N users")]
BackboneOption = Annotated[str, typer.Option(help="mean_diff | bipo | sae", callback=_backbone)]
LayerOption = Annotated[int | None, typer.Option(min=0, help=LAYER_HELP)]
ConstructionOption = Annotated[
    str | None,
    typer.Option(
        help="SteerX's personal-direction construction (default: likelihood_description for "
        "every backbone; see docs/method.md)"
    ),
]
DataOption = Annotated[str, typer.Option(help="users: a path or a built-in name", callback=_data)]
OutOption = Annotated[Path, typer.Option(help="output folder", callback=_out)]
WindowOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="time window of health_tweets / news_outlets: 0 = the newest items, k = the k-th "
        "earlier, disjoint block (a replicate on older items; combine runs with `steerx pool`)",
    ),
]
MaxHistoryOption = Annotated[
    int | None, typer.Option(min=1, help="keep each user's last N history items")
]
Describer = Literal["structured", "template", "llm"]
NewTokensOption = Annotated[int, typer.Option(min=1, help="tokens generated per prompt")]

app = typer.Typer(
    cls=_Commands, help="SteerX: disentangled activation steering for LLM personalization."
)
console = Console(stderr=True)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option(help="show the traceback of an error")] = False,
) -> None:
    """Options of every command (``--debug`` is read by :class:`_Commands`)."""


@app.command()
def demo(
    out: OutOption = Path("runs/demo"),
    backend: BackendOption = "hf",
    layer: Annotated[int, typer.Option(min=0, help="layer whose resid_post is steered")] = 10,
    alpha: Annotated[float, typer.Option(help="steering strength", callback=_finite)] = 2.0,
    max_new_tokens: NewTokensOption = 30,
    tiny: TinyOption = False,
) -> None:
    """A short steering demo on the demo model: unsteered vs steered continuations."""
    with out_lock(out):
        console.print(f"[bold]loading the {'tiny' if tiny else 'demo'} model on {backend}[/bold]")
        model = load_model(backend, tiny)
        site = f"blocks.{layer}.hook_resid_post"
        vector = contrast_vector(model, site)
        steer = hooks.Steer(site, vector, alpha=alpha, positions="prompt_last_and_generated")
        prompts = chat_prompts(model, DEMO_PROMPTS)
        plain = hooks.generate(model, prompts, max_new_tokens=max_new_tokens)
        steered = hooks.generate(model, prompts, steer, max_new_tokens=max_new_tokens)

        table = Table(title=f"Steering at {site}, alpha={alpha} (enthusiastic - flat)")
        for column in ("prompt", "unsteered", "steered"):
            table.add_column(column, overflow="fold")
        lines = [
            "# steerx_lens demo",
            "",
            f"Model: {'tiny random Llama' if tiny else 'SmolLM2-135M-Instruct (dequantized Q4_1)'}, "
            f"backend `{backend}`. Vector: mean activation of enthusiastic minus flat texts at "
            f"`{site}`; added with alpha={alpha} at the last prompt token and every generated "
            "token.",
            "",
            "| prompt | unsteered | steered |",
            "|---|---|---|",
        ]
        for prompt, before, after in zip(DEMO_PROMPTS, plain.texts, steered.texts, strict=True):
            table.add_row(prompt, before.strip(), after.strip())
            cells = [
                text.strip().replace("\n", " ").replace("|", "\\|")
                for text in (prompt, before, after)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        Console().print(table)
        write_text(out / "demo.md", "\n".join(lines) + "\n")
    console.print(f"wrote {out / 'demo.md'}")


def load_model(backend: str, tiny: bool, source: str | None = None, remote: str = "off") -> Any:
    """The model to run: the demo model, the tiny one, a local folder, or an NDIF model.

    ``remote`` is ``off``, ``local`` (nnsight's offline simulation of remote execution),
    ``ndif`` or an http(s) host (the model then is the hub id given as ``source``); the options
    are checked first (:func:`check_model_options`).
    """
    _backend(backend)
    _remote(remote)
    check_model_options(backend, remote, source)
    if remote not in ("off", "local"):
        from steerx_lens.backends.remote import load_remote_model

        return load_remote_model(source, remote=True if remote == "ndif" else remote)  # type: ignore[arg-type]
    if source is not None:
        model = load_model_dir(source, backend)  # type: ignore[arg-type]
    elif tiny:
        model = load_tiny_model(backend)  # type: ignore[arg-type]
    else:
        model = load_demo_model(backend)  # type: ignore[arg-type]
    if remote == "local":
        get_adapter(model, remote="local")
    return model


def _reasons(failures: dict[str, str]) -> str:
    """The first few ``user: why`` of ``failures``, for a one-line error."""
    return "; ".join(f"{uid}: {why}" for uid, why in list(failures.items())[:5])


@app.command()
def attribute(
    data: DataOption = "synthetic",
    out: OutOption = Path("runs/attribution"),
    users: UsersOption = None,
    max_history: MaxHistoryOption = None,
    window: WindowOption = 0,
    method: Annotated[Literal["patch", "prompt"], typer.Option(help="patch | prompt")] = "patch",
    describer: Annotated[
        Describer, typer.Option(help="structured | template | llm (the model itself)")
    ] = "structured",
    layer_map: Annotated[bool, typer.Option(help="also draw a layers x tokens map")] = False,
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Causal token attribution for each user: ranked spans, description, HTML views."""
    from dataclasses import asdict, replace

    from tqdm.auto import tqdm

    from steerx_lens.attribution import AttributionConfig, attribute_user, layer_effects
    from steerx_lens.describe import describe, description_quality, make_describer
    from steerx_lens.screening import ItemLimits, screen_items
    from steerx_lens.viz import save_attribution_html, save_layer_heatmap

    check_model_options(backend, remote, model_source)
    settings = AttributionConfig(method=method)
    population = load_population(data, None, max_history, window)  # all users: counterfactuals
    chosen = population[:users]
    names = user_file_names([user.user_id for user in chosen])
    with out_lock(out):
        model = load_model(backend, tiny, model_source, remote)
        adapter = get_adapter(model)
        limits = ItemLimits(adapter.max_positions, settings.max_context_tokens)
        writer = make_describer(describer, model)
        records, failures, skipped_items, attributions = [], {}, {}, {}
        for user in tqdm(chosen, desc="attributing users"):
            history, skipped = screen_items(
                adapter.tokenizer, user.user_id, user.history, "history item", limits
            )
            if skipped:
                skipped_items[user.user_id] = skipped
            try:
                usable = replace(user, history=history)
                result = describe(attribute_user(model, usable, population, settings), writer)
                record: dict[str, Any] = {
                    "user_id": user.user_id,
                    "spans": [
                        {"text": s.text, "score": s.score, "count": s.count} for s in result.spans
                    ],
                    "description": result.description,
                    "html": save_attribution_html(result, out / f"{names[user.user_id]}.html").name,
                }
                if layer_map:
                    first = layer_effects(model, usable, population, settings)[0]
                    heatmap = out / f"{names[user.user_id]}-layers.png"
                    record["layer_map"] = save_layer_heatmap(first, heatmap).name
            except ValueError as error:  # this user's data: the others go on
                failures[user.user_id] = f"{type(error).__name__}: {error}"
                continue
            records.append(record)
            attributions[user.user_id] = result
        if not records:
            raise DataError(f"no user could be attributed ({_reasons(failures)})")
        config = {
            "data": data,
            "method": method,
            "describer": describer,
            "backend": backend,
            "max_history": max_history,
            "window": window,
        }
        report: dict[str, Any] = {"config": config, "users": records}
        quality = None
        if sum(bool(a.spans) for a in attributions.values()) >= 2:  # the other-user control
            descriptions = {uid: a.description or "" for uid, a in attributions.items()}
            quality = description_quality(descriptions, attributions)
            report["description_quality"] = asdict(quality)
        report.update({"failures": failures} if failures else {})
        report.update({"skipped_items": skipped_items} if skipped_items else {})
        write_name_index(out, names)
        write_text(out / "attribution.json", json.dumps(report, indent=2))
    console.print(f"wrote {out / 'attribution.json'} and {len(records)} HTML views")
    if quality is not None:
        console.print(_quality_line(quality))
    for user_id, why in failures.items():
        console.print(f"[yellow]skipped {user_id}: {why}[/yellow]")


def _quality_line(quality: DescriptionQuality) -> str:
    """One line of :func:`steerx_lens.describe.description_quality` for the console."""
    faithful = quality.faithfulness
    return (
        f"descriptions name {quality.own_spans_named:.2f} of their own user's top spans and "
        f"{quality.other_spans_named:.2f} of another user's; faithfulness "
        f"{'n/a (no quoted claims)' if faithful is None else f'{faithful:.2f}'} "
        f"({quality.n_users} users)"
    )


def pipeline_config(
    layer: int | None,
    alpha: float,
    backbone: str,
    describer: str,
    r: float | None = None,
    max_context_tokens: int | None = None,
    construction: str | None = None,
) -> Any:
    """A :class:`SteerXConfig` from CLI options (unset options keep the documented defaults);
    a construction the backbone cannot build is refused before any model is loaded."""
    from steerx_lens.constructions import check_construction
    from steerx_lens.errors import SteerXError
    from steerx_lens.pipeline import SteerXConfig

    changes: dict[str, Any] = {
        "layer": layer,
        "alpha": alpha,
        "backbone": backbone,
        "describer": describer,
    }
    if r is not None:
        changes["r"] = r
    if max_context_tokens is not None:
        changes["max_context_tokens"] = max_context_tokens
    if construction is not None:
        try:
            check_construction(construction, backbone)
        except SteerXError as error:
            raise typer.BadParameter(str(error), param_hint="'--construction'") from None
        changes["construction"] = construction
    return SteerXConfig(**changes)


ContextOption = Annotated[
    int | None,
    typer.Option(min=64, help="token budget of attribution contexts and prompts (default 512)"),
]


def read_best(path: Path) -> dict[str, Any]:
    """The cells a ``best.json`` written by ``steerx sweep`` names, one per method (the other
    methods keep the command's layer, alpha and r); a file that is not such a JSON object is
    an error naming ``--best``. Read before any model is loaded."""
    from steerx_lens.evaluation.cells import read_cells

    try:
        return read_cells(path, {})
    except ValueError as error:
        raise typer.BadParameter(f"{path}: {error}", param_hint="'--best'") from None


@app.command()
def fit(
    data: DataOption = "synthetic",
    out: OutOption = Path("runs/fit"),
    users: UsersOption = None,
    backbone: BackboneOption = "mean_diff",
    construction: ConstructionOption = None,
    layer: LayerOption = None,
    alpha: Annotated[
        float, typer.Option(help="default steering strength (0: none)", callback=_finite)
    ] = 1.0,
    mode: Annotated[
        Literal["steerx", "baseline", "both"], typer.Option(help="steerx | baseline | both")
    ] = "both",
    describer: Annotated[
        Describer, typer.Option(help="structured | template | llm")
    ] = "structured",
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Fit SteerX and/or baseline vectors: one vector file per user and mode, plus fit.json."""
    from steerx_lens.data import load_users
    from steerx_lens.pipeline import SteerX
    from steerx_lens.screening import screen_history

    check_model_options(backend, remote, model_source)
    config = pipeline_config(layer, alpha, backbone, describer, construction=construction)
    population = load_users(data)[:users]
    names = user_file_names([user.user_id for user in population])
    with out_lock(out):
        model = load_model(backend, tiny, model_source, remote)
        pipeline = SteerX(model, config, cache_dir=out / "cache")
        screened, skipped_items = [], {}
        for user in population:
            usable, skipped = screen_history(pipeline, user)
            screened.append(usable)
            if skipped:
                skipped_items[user.user_id] = skipped
        result = pipeline.fit_many(screened)
        if not result.users:
            raise DataError(f"no user could be fitted ({_reasons(result.failures)})")
        result.population.save(out / "population")
        modes = ("steerx", "baseline") if mode == "both" else (mode,)
        records = []
        for user_id, fitted in result.users.items():
            files = {
                m: getattr(fitted, m).save(out / f"{names[user_id]}.{m}.safetensors").name
                for m in modes
            }
            records.append(
                {
                    "user_id": user_id,
                    "vectors": files,
                    "description": fitted.description,
                    "top_spans": [
                        {"text": s.text, "score": s.score, "count": s.count}
                        for s in fitted.attribution.spans[:10]
                    ],
                }
            )
        summary: dict[str, Any] = {
            "config": {"data": data, "backend": backend, **vars(config)},
            "users": records,
            "failures": result.failures,
        }
        summary.update({"skipped_items": skipped_items} if skipped_items else {})
        write_name_index(out, names)
        write_text(out / "fit.json", json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {len(records)} users' vectors and {out / 'fit.json'}")
    for user_id, why in result.failures.items():
        console.print(f"[yellow]skipped {user_id}: {why}[/yellow]")


@app.command()
def generate(
    vector: Annotated[Path, typer.Option(help="a vector file written by `steerx fit`")],
    prompt: Annotated[str, typer.Option(help="the user message")],
    alpha: Annotated[
        float | None, typer.Option(help="strength (default: the vector's)", callback=_finite)
    ] = None,
    max_new_tokens: NewTokensOption = 60,
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Print a steered completion of PROMPT."""
    from steerx_lens.text import build_prompt
    from steerx_lens.vectors import SteeringVector

    steering = SteeringVector.load(vector)  # a bad file is refused before the model loads
    check_model_options(backend, remote, model_source)
    model = load_model(backend, tiny, model_source, remote)
    steering.check_model(model)
    text = build_prompt(get_adapter(model).tokenizer, prompt)
    out = hooks.generate(model, [text], steering.to_steer(alpha), max_new_tokens=max_new_tokens)
    typer.echo(out.texts[0].strip())


def _print_metrics(metrics: RunMetrics) -> None:
    """The held-out table, the chosen strengths, the primary comparison and the goal's."""
    columns = ("nll", "nll_distinct", "nll_pref", "rougeL")
    table = Table(title=f"held-out metrics ({len(metrics.per_user)} users)")
    for column in ("method", *columns):
        table.add_column(column)
    for method, values in metrics.methods.items():
        table.add_row(
            method,
            *(f"{values.get(k):.4f}" if values.get(k) is not None else "–" for k in columns),
        )
    Console().print(table)
    choice = metrics.config.get("strength_choice")
    if choice and choice["methods"]:
        chosen = ", ".join(f"{m} {e['alpha']:g}" for m, e in choice["methods"].items())
        console.print(f"alpha chosen on validation items ({choice['n_users']} users): {chosen}")
    if metrics.primary is not None:
        p = metrics.primary
        console.print(
            f"primary (steerx vs baseline, nll): {p['mean']:+.4f} CI [{p['ci95'][0]:+.4f}, "
            f"{p['ci95'][1]:+.4f}], Wilcoxon p {p['wilcoxon_p']}, Holm p {p['p_holm']}, "
            f"{p['n_users']} users"
        )
    for c in metrics.goal:
        console.print(
            f"goal: {c['a']} vs {c['b']}, {c['metric']}: {c['mean']:+.4f}, "
            f"{c['n_positive']}/{c['n_users']} users, Holm p (goal family) {c['p_holm_goal']}"
        )


@app.command(name="eval")
def evaluate(
    data: DataOption = "health_tweets",
    out: OutOption = Path("runs/eval"),
    users: UsersOption = None,
    backbone: BackboneOption = "mean_diff",
    construction: ConstructionOption = None,
    layer: LayerOption = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="one steering strength for every method (0: none); default: each method's "
            "own, chosen among --alphas on validation items",
            callback=_finite,
        ),
    ] = None,
    alphas: Annotated[
        str,
        typer.Option(
            help="candidate strengths each method's alpha is chosen from on validation items "
            "(>= 0; 0 = not applied)",
            callback=_rs,
        ),
    ] = ",".join(f"{alpha:g}" for alpha in DEFAULT_ALPHA_CANDIDATES),
    r: Annotated[
        float | None,
        typer.Option(help="strength of SteerX's personal part (>= 0)", callback=_non_negative),
    ] = None,
    best: Annotated[
        Path | None, typer.Option(help="best.json from `steerx sweep` (each method's cell)")
    ] = None,
    generations: Annotated[bool, typer.Option(help="also score greedy generations")] = True,
    max_new_tokens: NewTokensOption = 40,
    describer: Annotated[
        Describer, typer.Option(help="structured | template | llm")
    ] = "structured",
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    max_history: MaxHistoryOption = None,
    window: WindowOption = 0,
    users_per_batch: Annotated[
        int, typer.Option(min=1, help="users evaluated together (shared forward batches)")
    ] = 8,
    n_validation: Annotated[
        int, typer.Option(min=0, help="validation items per user (kept out of fitting)")
    ] = 2,
    max_context_tokens: ContextOption = None,
    tiny: TinyOption = False,
) -> None:
    """The SteerX experiment: fit, evaluate every method on held-out text, write the report."""
    from steerx_lens.evaluation.experiment import Experiment

    check_model_options(backend, remote, model_source)
    config = pipeline_config(
        layer,
        1.0 if alpha is None else alpha,
        backbone,
        describer,
        r,
        max_context_tokens,
        construction,
    )
    cells = read_best(best) if best else None
    candidates = _floats(alphas) if alpha is None and best is None else None
    population = load_population(data, users, max_history, window)
    with out_lock(out):
        model = load_model(backend, tiny, model_source, remote)
        info = {
            "data": data,
            "backend": backend,
            "model": model_source or ("tiny" if tiny else "SmolLM2-135M-Instruct"),
            "max_history": max_history,
            "window": window,
        }
        experiment = Experiment(
            model,
            population,
            out,
            config,
            generations,
            max_new_tokens,
            info,
            users_per_batch=users_per_batch,
            cells=cells,
            n_validation=n_validation,
            alphas=candidates,
        )
        metrics = experiment.run()
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


@app.command()
def pool(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="`steerx eval` folders (or their metrics.json) of one configuration, one per "
            "--window"
        ),
    ],
    out: OutOption = Path("runs/pooled"),
) -> None:
    """Pool evaluations on disjoint time windows: each user's items over all runs, one report."""
    from steerx_lens.evaluation.experiment import METRICS_FILE
    from steerx_lens.evaluation.pooling import pool_runs, read_run
    from steerx_lens.evaluation.report import write_report

    metrics = pool_runs([read_run(run) for run in runs])
    with out_lock(out):
        write_text(out / METRICS_FILE, json.dumps(metrics.to_json(), indent=2))
        notes = [
            f"pooled over windows {metrics.config['window']} ({', '.join(map(str, runs))}): each "
            "user's held-out items of every window, alpha chosen per window on its validation items"
        ]
        write_report(metrics, out, notes=notes)
    _print_metrics(metrics)
    console.print(f"wrote {out / METRICS_FILE} and {out / 'report.md'}")


@app.command()
def sweep(
    data: DataOption = "health_tweets",
    out: OutOption = Path("runs/sweep"),
    users: UsersOption = None,
    layers: Annotated[
        str, typer.Option(help="start:stop:step or a comma list", callback=_layers)
    ] = "4:24:4",
    alphas: Annotated[
        str, typer.Option(help="comma list of strengths (0: none)", callback=_alphas)
    ] = "0.5,1,2",
    rs: Annotated[
        str, typer.Option(help="comma list of SteerX personal strengths r (>= 0)", callback=_rs)
    ] = "0.05,0.1,0.15,0.2",
    n_validation: Annotated[int, typer.Option(min=1, help="validation items per user")] = 2,
    max_context_tokens: ContextOption = None,
    max_history: MaxHistoryOption = None,
    backbone: BackboneOption = "mean_diff",
    construction: ConstructionOption = None,
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Layer × alpha (× r) sweep on validation items; writes best.json for `steerx eval`."""
    from steerx_lens.sweep import parse_layers, run_sweep

    check_model_options(backend, remote, model_source)
    layer_list = parse_layers(layers)
    population = load_population(data, users, max_history)
    config = pipeline_config(
        layer_list[0],
        1.0,
        backbone,
        "structured",
        max_context_tokens=max_context_tokens,
        construction=construction,
    )
    with out_lock(out):
        model = load_model(backend, tiny, model_source, remote)
        result = run_sweep(
            model,
            population,
            layer_list,
            _floats(alphas),
            out,
            config,
            rs=_floats(rs, minimum=0.0),
            n_validation=n_validation,
        )
    for method, cell in result["best"]["methods"].items():
        flip = result["sign_flip"][method]
        console.print(
            f"{method}: {cell} (at -alpha: {flip['validation_nll_change']:+.4f}, sign-flip "
            f"check {'passed' if flip['passed'] else 'FAILED'})"
        )
    console.print(f"wrote {out / 'best.json'}")


EXPORT_FORMATS = ("gguf", "repeng", "steering-vectors")


@app.command(name="export")
def export_vectors(
    vectors: Annotated[list[Path], typer.Argument(help="vector files of one model, one per layer")],
    out: Annotated[Path, typer.Option(help="the file to write")],
    to: Annotated[str, typer.Option("--format", help=" | ".join(EXPORT_FORMATS))] = "gguf",
    model_hint: Annotated[
        str, typer.Option(help="the model's architecture (GGUF) or HF model_type (repeng)")
    ] = "llama",
) -> None:
    """Write vectors for another tool: a GGUF control vector (llama.cpp `--control-vector`,
    ollama, repeng's ControlVector.import_gguf) or a steering-vectors safetensors file."""
    from steerx_lens.interop import export_gguf, to_layer_tensors
    from steerx_lens.vectors import SteeringVector

    if to not in EXPORT_FORMATS:
        raise typer.BadParameter(f"--format must be one of {EXPORT_FORMATS}, got {to!r}")
    loaded = [SteeringVector.load(path) for path in vectors]
    if to == "steering-vectors":
        to_layer_tensors(loaded, out)
    else:
        export_gguf(loaded, out, model_hint=model_hint)
    strengths = sorted({v.alpha for v in loaded})
    typer.echo(f"wrote {out} ({to}, {len(loaded)} layer(s)); their strength was {strengths}")


@app.command(name="import")
def import_vectors(
    path: Annotated[Path, typer.Argument(help="a .gguf control vector or a steering-vectors file")],
    out: Annotated[
        Path, typer.Option(help="folder for the vector files (one per layer)", callback=_out)
    ],
    alpha: Annotated[
        float, typer.Option(help="strength recorded on the vectors", callback=_finite)
    ] = 1.0,
    backend: BackendOption = "hf",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Read another tool's vector as steerx_lens vector files for the model (one per layer)."""
    from steerx_lens.interop import from_layer_tensors, import_gguf

    check_model_options(backend, "off", model_source)
    with out_lock(out):
        model = load_model(backend, tiny, model_source)
        reader = import_gguf if path.suffix == ".gguf" else from_layer_tensors
        for vector in reader(path, model, alpha=alpha):
            target = vector.save(out / f"{path.stem}.{vector.site}.safetensors")
            typer.echo(
                f"{target}: {vector.site} (other tools steer every position: positions='all')"
            )


@app.command()
def info() -> None:
    """Print versions of the stack steerx_lens runs on."""
    from importlib.metadata import version

    for package in (
        "steerx-lens",
        "torch",
        "transformers",
        "transformer-lens",
        "nnsight",
        "sae-lens",
    ):
        typer.echo(f"{package} {version(package)}")


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """Console entry point: offline unless told otherwise, warnings as one line each, then the
    app (which prints every error as one line and exits with status 1, or 2 for options)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a program may set its own environment
    warnings.formatwarning = _warning_line
    app()


if __name__ == "__main__":
    main()
