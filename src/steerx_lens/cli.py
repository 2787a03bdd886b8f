"""The ``steerx`` command line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from steerx_lens import hooks
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
        tmp_name = tmp.name
    os.replace(tmp_name, path)


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
    model = load_tiny_model(backend) if tiny else load_demo_model(backend)  # type: ignore[arg-type]
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
    write_text_atomic(out / "demo.md", "\n".join(lines) + "\n")
    console.print(f"wrote {out / 'demo.md'}")


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
