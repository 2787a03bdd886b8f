"""The ``steerx`` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from steerx_lens import hooks
from steerx_lens.atomic import safe_filename, write_text
from steerx_lens.backends import REGISTRY, get_adapter
from steerx_lens.demo import DEMO_PROMPTS, chat_prompts, contrast_vector
from steerx_lens.models import load_demo_model, load_model_dir, load_tiny_model

LAYER_HELP = "layer whose resid_post is steered (default: 40% of the depth, 12 on the demo model)"
REMOTE_HELP = "off | local (nnsight's offline simulation of NDIF) | ndif (needs NDIF_API_KEY) | URL"
MODEL_HELP = "a local model folder, or with --remote ndif a hub id (default: the demo model)"
# Options shared by several commands.
BackendOption = Annotated[str, typer.Option(help=f"one of {tuple(REGISTRY)}")]
RemoteOption = Annotated[str, typer.Option(help=REMOTE_HELP)]
ModelOption = Annotated[str | None, typer.Option("--model", help=MODEL_HELP)]
TinyOption = Annotated[bool, typer.Option(help="use the tiny random model (smoke test)")]
UsersOption = Annotated[int | None, typer.Option(help="only the first N users")]
BackboneOption = Annotated[str, typer.Option(help="mean_diff | bipo | sae")]
LayerOption = Annotated[int | None, typer.Option(help=LAYER_HELP)]
app = typer.Typer(help="SteerX: disentangled activation steering for LLM personalization.")
console = Console(stderr=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    backend: BackendOption = "hf",
    layer: Annotated[int, typer.Option(help="layer whose resid_post is steered")] = 10,
    alpha: Annotated[float, typer.Option(help="steering strength")] = 2.0,
    max_new_tokens: Annotated[int, typer.Option()] = 30,
    tiny: TinyOption = False,
) -> None:
    """A short steering demo on the demo model: unsteered vs steered continuations."""
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
        f"`{site}`; added with alpha={alpha} at the last prompt token and every generated token.",
        "",
        "| prompt | unsteered | steered |",
        "|---|---|---|",
    ]
    for prompt, before, after in zip(DEMO_PROMPTS, plain.texts, steered.texts, strict=True):
        table.add_row(prompt, before.strip(), after.strip())
        cells = [
            text.strip().replace("\n", " ").replace("|", "\\|") for text in (prompt, before, after)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    write_text(out / "demo.md", "\n".join(lines) + "\n")
    console.print(f"wrote {out / 'demo.md'}")


def load_model(backend: str, tiny: bool, source: str | None = None, remote: str = "off") -> Any:
    """The model to run: the demo model, the tiny one, a local folder, or an NDIF model.

    ``remote`` is ``off``, ``local`` (nnsight's offline simulation of remote execution),
    ``ndif`` or an http(s) host (the model then is the hub id given as ``source``).
    """
    if backend not in REGISTRY:
        raise typer.BadParameter(f"unknown backend {backend!r}; choose one of {tuple(REGISTRY)}")
    is_host = remote.startswith(("http://", "https://"))
    if remote not in ("off", "local", "ndif") and not is_host:
        raise typer.BadParameter(f"--remote must be off, local, ndif or an http(s) host: {remote}")
    if remote != "off" and backend != "nnsight":
        raise typer.BadParameter("--remote runs through nnsight: add --backend nnsight")
    if remote == "ndif" or is_host:
        if source is None:
            raise typer.BadParameter(f"--remote {remote} needs --model ORG/NAME (hosted on NDIF)")
        from steerx_lens.backends.remote import load_remote_model

        return load_remote_model(source, remote=True if remote == "ndif" else remote)
    if source is not None:
        model = load_model_dir(source, backend)  # type: ignore[arg-type]
    elif tiny:
        model = load_tiny_model(backend)  # type: ignore[arg-type]
    else:
        model = load_demo_model(backend)  # type: ignore[arg-type]
    if remote == "local":
        get_adapter(model, remote="local")
    return model


@app.command()
def attribute(
    data: Annotated[str, typer.Option(help="users: a path or a built-in name")] = "synthetic",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/attribution"),
    users: UsersOption = None,
    method: Annotated[str, typer.Option(help="patch | prompt")] = "patch",
    describer: Annotated[str, typer.Option(help="template | llm (the model itself)")] = "llm",
    layer_map: Annotated[bool, typer.Option(help="also draw a layers x tokens map")] = False,
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Causal token attribution for each user: ranked spans, description, HTML views."""
    from tqdm.auto import tqdm

    from steerx_lens.attribution import AttributionConfig, attribute_user, layer_effects
    from steerx_lens.data import load_users
    from steerx_lens.describe import LLMDescriber, TemplateDescriber, describe
    from steerx_lens.viz import save_attribution_html, save_layer_heatmap

    settings = AttributionConfig(method=method)  # type: ignore[arg-type]
    population = load_users(data)
    chosen = population[:users] if users else population
    model = load_model(backend, tiny, model_source, remote)
    writer = LLMDescriber(model) if describer == "llm" else TemplateDescriber()
    records = []
    for user in tqdm(chosen, desc="attributing users"):
        result = describe(attribute_user(model, user, population, settings), writer)
        html_name = f"{safe_filename(user.user_id)}.html"
        save_attribution_html(result, out / html_name)
        record: dict[str, Any] = {
            "user_id": user.user_id,
            "spans": [{"text": s.text, "score": s.score, "count": s.count} for s in result.spans],
            "description": result.description,
            "html": html_name,
        }
        if layer_map:
            first = layer_effects(model, user, population, settings)[0]
            record["layer_map"] = save_layer_heatmap(
                first, out / f"{safe_filename(user.user_id)}-layers.png"
            ).name
        records.append(record)
    config = {"data": data, "method": method, "describer": describer, "backend": backend}
    write_text(out / "attribution.json", json.dumps({"config": config, "users": records}, indent=2))
    console.print(f"wrote {out / 'attribution.json'} and {len(records)} HTML views")


def pipeline_config(
    layer: int | None, alpha: float, backbone: str, describer: str, r: float | None = None
) -> Any:
    """A :class:`SteerXConfig` from CLI options (unset options keep the documented defaults)."""
    from steerx_lens.pipeline import SteerXConfig

    changes: dict[str, Any] = {
        "layer": layer,
        "alpha": alpha,
        "backbone": backbone,
        "describer": describer,
    }
    if r is not None:
        changes["r"] = r
    return SteerXConfig(**changes)


def read_best(path: Path | None) -> dict[str, Any]:
    """``best.json`` written by ``steerx sweep`` (layer, alpha), or nothing."""
    return json.loads(path.read_text()) if path else {}


@app.command()
def fit(
    data: Annotated[str, typer.Option(help="users: a path or a built-in name")] = "synthetic",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/fit"),
    users: UsersOption = None,
    backbone: BackboneOption = "mean_diff",
    layer: LayerOption = None,
    alpha: Annotated[float, typer.Option(help="default steering strength")] = 1.0,
    mode: Annotated[str, typer.Option(help="steerx | baseline | both")] = "both",
    describer: Annotated[str, typer.Option(help="template | llm")] = "template",
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Fit SteerX and/or baseline vectors: one vector file per user and mode, plus fit.json."""
    from steerx_lens.data import load_users
    from steerx_lens.pipeline import SteerX

    if mode not in ("steerx", "baseline", "both"):
        raise typer.BadParameter(f"unknown mode {mode!r}; use steerx, baseline or both")
    population = load_users(data)
    model = load_model(backend, tiny, model_source, remote)
    config = pipeline_config(layer, alpha, backbone, describer)
    result = SteerX(model, config, cache_dir=out / "cache").fit_many(
        population[:users] if users else population
    )
    result.population.save(out / "population")
    modes = ("steerx", "baseline") if mode == "both" else (mode,)
    records = []
    for user_id, fitted in result.users.items():
        files = {
            m: getattr(fitted, m).save(out / f"{safe_filename(user_id)}.{m}.safetensors").name
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
    summary = {
        "config": {"data": data, "backend": backend, **vars(config)},
        "users": records,
        "failures": result.failures,
    }
    write_text(out / "fit.json", json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {len(records)} users' vectors and {out / 'fit.json'}")
    for user_id, why in result.failures.items():
        console.print(f"[yellow]skipped {user_id}: {why}[/yellow]")


@app.command()
def generate(
    vector: Annotated[Path, typer.Option(help="a vector file written by `steerx fit`")],
    prompt: Annotated[str, typer.Option(help="the user message")],
    alpha: Annotated[float | None, typer.Option(help="strength (default: the vector's)")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 60,
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Print a steered completion of PROMPT."""
    from steerx_lens.text import build_prompt
    from steerx_lens.vectors import SteeringVector

    model = load_model(backend, tiny, model_source, remote)
    steering = SteeringVector.load(vector, model=model)
    text = build_prompt(get_adapter(model).tokenizer, prompt)
    out = hooks.generate(model, [text], steering.to_steer(alpha), max_new_tokens=max_new_tokens)
    typer.echo(out.texts[0].strip())


@app.command(name="eval")
def evaluate(
    data: Annotated[str, typer.Option(help="users: a path or a built-in name")] = "health_tweets",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/eval"),
    users: UsersOption = None,
    backbone: BackboneOption = "mean_diff",
    layer: LayerOption = None,
    alpha: Annotated[float, typer.Option(help="steering strength")] = 1.0,
    r: Annotated[float | None, typer.Option(help="strength of SteerX's personal part")] = None,
    best: Annotated[Path | None, typer.Option(help="best.json from `steerx sweep`")] = None,
    generations: Annotated[bool, typer.Option(help="also score greedy generations")] = True,
    max_new_tokens: Annotated[int, typer.Option()] = 40,
    describer: Annotated[str, typer.Option(help="template | llm")] = "llm",
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    max_history: Annotated[
        int | None, typer.Option(help="keep each user's last N history items")
    ] = None,
    users_per_batch: Annotated[
        int, typer.Option(help="users evaluated together (shared forward batches)")
    ] = 8,
    tiny: TinyOption = False,
) -> None:
    """The SteerX experiment: fit, evaluate every method on held-out text, write the report."""
    from dataclasses import replace

    from steerx_lens.data import load_users
    from steerx_lens.evaluation.experiment import Experiment

    chosen = read_best(best)
    config = pipeline_config(
        chosen.get("layer", layer),
        chosen.get("alpha", alpha),
        backbone,
        describer,
        chosen.get("r", r),
    )
    population = load_users(data, n_users=users)
    if max_history:
        population = [replace(u, history=u.history[-max_history:]) for u in population]
    model = load_model(backend, tiny, model_source, remote)
    info = {
        "data": data,
        "backend": backend,
        "model": model_source or ("tiny" if tiny else "SmolLM2-135M-Instruct"),
        "max_history": max_history,
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
    )
    metrics = experiment.run()
    table = Table(title=f"held-out NLL ({len(metrics.per_user)} users)")
    for column in ("method", "nll", "nll_pref"):
        table.add_column(column)
    for method, values in metrics.methods.items():
        table.add_row(
            method,
            *(
                f"{values.get(k):.4f}" if values.get(k) is not None else "–"
                for k in ("nll", "nll_pref")
            ),
        )
    Console().print(table)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


@app.command()
def sweep(
    data: Annotated[str, typer.Option(help="users: a path or a built-in name")] = "health_tweets",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/sweep"),
    users: UsersOption = None,
    layers: Annotated[str, typer.Option(help="start:stop:step or a comma list")] = "4:24:4",
    alphas: Annotated[str, typer.Option(help="comma list of strengths")] = "0.5,1,2",
    rs: Annotated[
        str, typer.Option(help="comma list of SteerX personal strengths r")
    ] = "0.05,0.1,0.15,0.2",
    n_validation: Annotated[int, typer.Option(help="validation items per user")] = 2,
    backbone: BackboneOption = "mean_diff",
    backend: BackendOption = "hf",
    remote: RemoteOption = "off",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Layer × alpha (× r) sweep on validation items; writes best.json for `steerx eval`."""
    from steerx_lens.data import load_users
    from steerx_lens.sweep import parse_layers, run_sweep

    model = load_model(backend, tiny, model_source, remote)
    first_layer = parse_layers(layers)[0]
    config = pipeline_config(first_layer, 1.0, backbone, "template")
    result = run_sweep(
        model,
        load_users(data, n_users=users),
        parse_layers(layers),
        [float(a) for a in alphas.split(",")],
        out,
        config,
        rs=[float(r) for r in rs.split(",")],
        n_validation=n_validation,
    )
    console.print(f"best on validation: {result['best']}; wrote {out / 'best.json'}")


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


if __name__ == "__main__":
    app()


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
    out: Annotated[Path, typer.Option(help="folder for the vector files (one per layer)")],
    alpha: Annotated[float, typer.Option(help="strength recorded on the vectors")] = 1.0,
    backend: BackendOption = "hf",
    model_source: ModelOption = None,
    tiny: TinyOption = False,
) -> None:
    """Read another tool's vector as steerx_lens vector files for the model (one per layer)."""
    from steerx_lens.interop import from_layer_tensors, import_gguf

    model = load_model(backend, tiny, model_source)
    reader = import_gguf if path.suffix == ".gguf" else from_layer_tensors
    for vector in reader(path, model, alpha=alpha):
        target = vector.save(out / f"{path.stem}.{vector.site}.safetensors")
        typer.echo(f"{target}: {vector.site} (other tools steer every position: positions='all')")


def main() -> None:
    """Console entry point: a library error prints as one clear line and exits with status 1."""
    from steerx_lens.errors import SteerXError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a program may set its own environment
    try:
        app()
    except SteerXError as error:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {error}")
        raise SystemExit(1) from None
