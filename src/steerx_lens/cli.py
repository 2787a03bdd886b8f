"""The ``steerx`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from steerx_lens import hooks
from steerx_lens.atomic import write_text
from steerx_lens.backends import get_adapter
from steerx_lens.models import BACKENDS, load_demo_model, load_tiny_model

app = typer.Typer(help="SteerX: disentangled activation steering for LLM personalization.")
console = Console(stderr=True)

# A contrast that is easy to see in a 135M model: enthusiastic vs. flat statements.
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


def contrast_vector(model: Any, site: str) -> torch.Tensor:
    """Mean-difference vector: mean activation over positive minus negative texts (all tokens)."""

    def mean_activation(texts: list[str]) -> torch.Tensor:
        batch = get_adapter(model).encode(texts)
        _, acts = hooks.cache(model, batch, [site])
        mask = batch.attention_mask.unsqueeze(-1).to(acts[site].dtype)
        return (acts[site] * mask).sum(dim=(0, 1)) / mask.sum()

    return mean_activation(POSITIVE_TEXTS) - mean_activation(NEGATIVE_TEXTS)


def chat_prompts(model: Any, prompts: list[str]) -> list[str]:
    """Wrap prompts in the tokenizer's chat template when it has one."""
    tokenizer = get_adapter(model).tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return prompts
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    backend: Annotated[str, typer.Option(help=f"one of {BACKENDS}")] = "hf",
    layer: Annotated[int, typer.Option(help="layer whose resid_post is steered")] = 10,
    alpha: Annotated[float, typer.Option(help="steering strength")] = 2.0,
    max_new_tokens: Annotated[int, typer.Option()] = 30,
    tiny: Annotated[bool, typer.Option(help="use the tiny random model (smoke test)")] = False,
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


def load_model(backend: str, tiny: bool) -> Any:
    """The demo model (or the tiny random model) on ``backend``, with a clear error."""
    if backend not in BACKENDS:
        raise typer.BadParameter(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return load_tiny_model(backend) if tiny else load_demo_model(backend)  # type: ignore[arg-type]


def safe_name(user_id: str) -> str:
    """A file-name-safe version of a user id."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in user_id)


@app.command()
def attribute(
    data: Annotated[str, typer.Option(help="users: a path or a built-in name")] = "synthetic",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/attribution"),
    users: Annotated[int | None, typer.Option(help="only the first N users")] = None,
    method: Annotated[str, typer.Option(help="patch | prompt")] = "patch",
    describer: Annotated[str, typer.Option(help="template | llm (the model itself)")] = "llm",
    layer_map: Annotated[bool, typer.Option(help="also draw a layers x tokens map")] = False,
    backend: Annotated[str, typer.Option(help=f"one of {BACKENDS}")] = "hf",
    tiny: Annotated[bool, typer.Option(help="use the tiny random model (smoke test)")] = False,
) -> None:
    """Causal token attribution for each user: ranked spans, description, HTML views."""
    from tqdm.auto import tqdm

    from steerx_lens.attribution import attribute_user, layer_effects
    from steerx_lens.data import load_users
    from steerx_lens.describe import LLMDescriber, TemplateDescriber, describe
    from steerx_lens.viz import save_attribution_html, save_layer_heatmap

    population = load_users(data)
    chosen = population[:users] if users else population
    model = load_model(backend, tiny)
    writer = LLMDescriber(model) if describer == "llm" else TemplateDescriber()
    records = []
    for user in tqdm(chosen, desc="attributing users"):
        result = describe(attribute_user(model, user, population, method=method), writer)
        html_name = f"{safe_name(user.user_id)}.html"
        save_attribution_html(result, out / html_name)
        record: dict[str, Any] = {
            "user_id": user.user_id,
            "spans": [{"text": s.text, "score": s.score, "count": s.count} for s in result.spans],
            "description": result.description,
            "html": html_name,
        }
        if layer_map:
            first = layer_effects(model, user, population)[0]
            record["layer_map"] = save_layer_heatmap(
                first, out / f"{safe_name(user.user_id)}-layers.png"
            ).name
        records.append(record)
    config = {"data": data, "method": method, "describer": describer, "backend": backend}
    write_text(out / "attribution.json", json.dumps({"config": config, "users": records}, indent=2))
    console.print(f"wrote {out / 'attribution.json'} and {len(records)} HTML views")


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
