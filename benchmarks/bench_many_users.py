"""Many users at once: steered generation for several users in one batch vs one after another.

For ``--users`` users (default 8), each with its own chat prompt and its own random steering
vector at ``blocks.12.hook_resid_post`` (``positions="prompt_last_and_generated"``), greedy
decoding of ``--tokens`` new tokens on the demo model (SmolLM2-135M-Instruct, fp32, CPU), per
backend:

- ``batched``: one ``hooks.generate`` call over every user's prompt (left-padded) with one
  ``Steer`` holding a vector per row (``pipeline.stacked_steer``, what ``SteerX.generate`` does);
- ``sequential``: the same users one after another, one ``hooks.generate`` call (batch 1) each.

Reported: generated tokens per second of both, their ratio (the goal is batched >= 3x
sequential), and whether every batched row decodes exactly the tokens of its sequential run.
Every configuration is warmed up with a short generation, then the repeats are interleaved
(round-robin, the start rotating each round) and the median is reported. The markdown table is
printed and written to ``benchmarks/results/many_users.md``.

Run: ``.venv/bin/python benchmarks/bench_many_users.py [--tokens 32] [--repeats 3]
[--backends hf,nnsight]``
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from bench_generation import (  # noqa: E402
    canonical,
    decode_steps,
    log,
    machine_info,
    write_results,
)
from jaxtyping import Int  # noqa: E402
from torch import Tensor  # noqa: E402

from steerx_lens import hooks  # noqa: E402
from steerx_lens.backends import (
    BACKENDS,  # noqa: E402
    get_adapter,  # noqa: E402
)
from steerx_lens.backends.base import eos_token_ids  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.pipeline import stacked_steer  # noqa: E402
from steerx_lens.text import build_prompt  # noqa: E402
from steerx_lens.vectors import SteeringVector  # noqa: E402

SITE = "blocks.12.hook_resid_post"
STEER_SCALE = 0.2  # steering-vector norm relative to the median residual norm at SITE
GOAL = 3.0  # batched tokens/s >= GOAL x sequential tokens/s
RESULTS = Path(__file__).resolve().parent / "results" / "many_users.md"

# One request per user, of different lengths (the batch is left-padded).
REQUESTS = [
    "Any tips for a rainy day?",
    "How should I plan a weekend trip to the mountains with two small children?",
    "What is a good breakfast before a long run?",
    "Explain how vaccines train the immune system.",
    "Suggest a book for a long train ride.",
    "How do I keep basil alive on a windowsill through the winter?",
    "What should I cook tonight?",
    "Write a short note thanking my neighbour for watering the plants.",
]


@dataclass
class Config:
    """One timed configuration: ``run`` returns the new tokens ``[users, <= n_new]``."""

    backend: str
    kind: str  # "batched" or "sequential"
    n_new: int
    run: Callable[[int], Int[Tensor, "users new"]]  # argument: max_new_tokens
    times: list[float] = field(default_factory=list)
    new_tokens: Int[Tensor, "users new"] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        return (max(self.times) - min(self.times)) / self.median


def user_vectors(
    model: object, prompts: list[str], seed: int
) -> tuple[list[SteeringVector], float]:
    """A random vector per user, norm STEER_SCALE x the median residual norm at SITE."""
    adapter = get_adapter(model)
    batch = adapter.encode(prompts, padding_side="left")
    _, store = hooks.cache(model, batch, [SITE])
    norm = float(store[SITE].norm(dim=-1)[batch.attention_mask.bool()].median())
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(prompts), adapter.d_model, generator=generator)
    rows = directions / directions.norm(dim=-1, keepdim=True) * (STEER_SCALE * norm)
    fingerprint = adapter.fingerprint()
    vectors = [
        SteeringVector(row, SITE, fingerprint, mode="other", user_id=f"user-{i}")
        for i, row in enumerate(rows)
    ]
    return vectors, norm


def backend_configs(
    backend: str, model: object, prompts: list[str], vectors: list[SteeringVector], n_new: int
) -> list[Config]:
    """The batched and the sequential configuration of one backend."""
    batched_steer = stacked_steer(vectors)
    single_steers = [stacked_steer([vector]) for vector in vectors]

    def batched(tokens: int) -> Tensor:
        return hooks.generate(model, prompts, batched_steer, max_new_tokens=tokens).new_tokens

    def sequential(tokens: int) -> Tensor:
        rows = [
            hooks.generate(model, [prompt], steer, max_new_tokens=tokens).new_tokens[0]
            for prompt, steer in zip(prompts, single_steers, strict=True)
        ]
        return torch.stack(rows)

    return [
        Config(backend, "batched", n_new, batched),
        Config(backend, "sequential", n_new, sequential),
    ]


def build_configs(
    backends: list[str], n_users: int, n_new: int, seed: int
) -> tuple[list[Config], dict]:
    """Load each backend's demo model and build its two configurations (same prompts, vectors)."""
    requests = [REQUESTS[i % len(REQUESTS)] for i in range(n_users)]
    info: dict = {}
    configs: list[Config] = []
    for backend in backends:
        start = time.perf_counter()
        model = load_demo_model(backend)
        log(f"loaded {backend} in {time.perf_counter() - start:.1f}s")
        adapter = get_adapter(model)
        prompts = [build_prompt(adapter.tokenizer, request) for request in requests]
        vectors, norm = user_vectors(model, prompts, seed)
        configs += backend_configs(backend, model, prompts, vectors, n_new)
        info.setdefault("eos", eos_token_ids(None, adapter.tokenizer))
        info.setdefault("pad", adapter.pad_token_id)
        info.setdefault("prompt_lens", [len(adapter.tokenizer(p)["input_ids"]) for p in prompts])
        info.setdefault("steer_norm", STEER_SCALE * norm)
        info.setdefault("resid_norm", norm)
    return configs, info


def measure(configs: list[Config], repeats: int) -> list[str]:
    """Warm up, then time the interleaved repeats; returns the load average after each round."""
    loads = []
    for config in configs:
        gc.collect()
        start = time.perf_counter()
        config.run(2)
        log(f"warm-up {config.backend} {config.kind}: {time.perf_counter() - start:.2f}s")
    for round_ in range(repeats):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            gc.collect()
            start = time.perf_counter()
            new_tokens = config.run(config.n_new)
            config.times.append(time.perf_counter() - start)
            if config.new_tokens is None:
                config.new_tokens = new_tokens
            elif not torch.equal(new_tokens, config.new_tokens):
                log(f"{config.backend} {config.kind}: repeat {round_ + 1} decoded other tokens")
        loads.append(", ".join(f"{x:.2f}" for x in os.getloadavg()))
        log(f"round {round_ + 1}/{repeats} done (load average {loads[-1]})")
    return loads


def generated_tokens(new_tokens: Tensor, eos: set[int]) -> int:
    """Tokens the users received: every row up to and including its first EOS."""
    return sum(decode_steps(row[None], eos) for row in new_tokens)


def table(configs: list[Config], info: dict) -> tuple[str, list[str]]:
    """The markdown table (one row per backend) and notes on differing tokens or early EOS."""
    eos, pad = info["eos"], info["pad"]
    notes: list[str] = []
    lines = [
        "| backend | new tokens | sequential s (batch 1 x users) | batched s (one call) "
        "| sequential tok/s | batched tok/s | batched / sequential | spread seq / batched "
        "| same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    by_backend: dict[str, dict[str, Config]] = {}
    for config in configs:
        by_backend.setdefault(config.backend, {})[config.kind] = config
    for backend, pair in by_backend.items():
        batched, sequential = pair["batched"], pair["sequential"]
        assert batched.new_tokens is not None and sequential.new_tokens is not None
        n_new = batched.n_new
        a = canonical(batched.new_tokens, n_new, eos, pad)
        b = canonical(sequential.new_tokens, n_new, eos, pad)
        differ = [i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])]
        same = "yes" if not differ else f"NO (rows {differ})"
        if differ:
            notes.append(f"{backend}: batched rows {differ} decode other tokens than alone")
        tokens = generated_tokens(b, eos)
        if tokens < n_new * a.shape[0]:
            notes.append(f"{backend}: rows stopped at EOS ({tokens} of {n_new * a.shape[0]})")
        ratio = sequential.median / batched.median
        verdict = "ok" if ratio >= GOAL else "UNDER"
        lines.append(
            f"| {backend} | {n_new} | {sequential.median:.2f} | {batched.median:.2f} "
            f"| {tokens / sequential.median:.1f} | {tokens / batched.median:.1f} "
            f"| **{ratio:.2f}x** ({verdict} >= {GOAL:.0f}x) "
            f"| {sequential.spread:.0%} / {batched.spread:.0%} | {same} |"
        )
    return "\n".join(lines), notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=8, help="users (prompt rows) per batch")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, as bench_generation.py; 0 keeps torch's default)",
    )
    args = parser.parse_args(argv)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        parser.error(f"--backends: unknown {unknown}; choose from {BACKENDS}")
    if min(args.users, args.tokens, args.repeats) < 1:
        parser.error("--users, --tokens and --repeats must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    configs, info = build_configs(backends, args.users, args.tokens, args.seed)
    load_start = os.getloadavg()
    loads = measure(configs, args.repeats)
    body, notes = table(configs, info)
    print(body)
    for note in notes:
        print(f"note: {note}")
    load_lines = [
        f"- load average before the timed runs: {', '.join(f'{x:.2f}' for x in load_start)}",
        *(f"- load average after round {i + 1}: {load}" for i, load in enumerate(loads)),
    ]
    print("\n".join(load_lines))
    omp = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    header = [
        "# Many users at once: batched vs sequential steered generation",
        "",
        f"{args.users} users, each with its own chat prompt (prompt lengths "
        f"{min(info['prompt_lens'])}-{max(info['prompt_lens'])} tokens, left-padded when "
        f"batched) and its own random steering vector at `{SITE}` (positions "
        f"`prompt_last_and_generated`, norm {info['steer_norm']:.1f} = {STEER_SCALE} x median "
        f"residual norm {info['resid_norm']:.1f}); greedy decoding on the demo model "
        "SmolLM2-135M-Instruct (dequantized Q4_1, fp32, CPU). **Batched**: one `hooks.generate` "
        "call with a `Steer` holding one vector per row (`pipeline.stacked_steer`, as "
        "`SteerX.generate`); **sequential**: one call per user (batch 1). tok/s counts the "
        "tokens the users receive (each row up to its first EOS). Median of "
        f"{args.repeats} interleaved repeats after a short warm-up; spread = (max - min) / "
        f"median. Goal: batched >= {GOAL:.0f}x sequential. Same tokens: every batched row "
        "decodes exactly the tokens of its sequential run.",
        "",
        f"Command: `{omp}{' '.join(['benchmarks/bench_many_users.py', *(argv or sys.argv[1:])])}`",
        "",
    ]
    machine = ["Machine (shared with other jobs: read the load average):", "", *machine_info()]
    write_results(args.out, header, body, notes, [*machine, *load_lines])
    return 0


if __name__ == "__main__":
    sys.exit(main())
