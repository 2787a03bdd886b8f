"""Generation speed of ``steerx_lens.hooks.generate`` on every backend, side by side.

Greedy decoding of ``--tokens`` new tokens on the demo model (SmolLM2-135M-Instruct, fp32, CPU)
for a fixed prompt (or a small batch of prompts, left-padded), for:

- ``hf reference``: plain ``transformers`` ``model.generate(do_sample=False)``, no hooks;
- for each backend (``hf``, ``transformer_lens``, ``bridge``, ``nnsight``): ``hooks.generate``
  unsteered, and with one ``Steer`` at ``blocks.10.hook_resid_post`` (random vector, norm ~0.1
  of a typical residual norm there, ``positions="prompt_last_and_generated"``);
- ``transformer_lens native``: ``HookedTransformer.generate(do_sample=False,
  use_past_kv_cache=True)``, to compare with steerx_lens's own KV-cached loop.

Every configuration is warmed up once, then the repeats are interleaved (round-robin over the
configurations, the starting point rotating each round) and the median is reported, so that
load from other processes hits all configurations alike. Results are printed as a markdown
table and written to ``benchmarks/results/generation.md``.

Run: ``.venv/bin/python benchmarks/bench_generation.py [--tokens 40] [--repeats 3] [--batch 1]``
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from steerx_lens import hooks  # noqa: E402
from steerx_lens.atomic import write_text  # noqa: E402
from steerx_lens.backends import (
    BACKENDS,  # noqa: E402
    get_adapter,  # noqa: E402
)
from steerx_lens.backends.base import (  # noqa: E402
    Batch,
    eos_token_ids,
    finish_after_eos,
    pad_to_length,
)
from steerx_lens.models import load_demo_model  # noqa: E402

SITE = "blocks.10.hook_resid_post"
POSITIONS = "prompt_last_and_generated"
STEER_SCALE = 0.1  # steering-vector norm relative to the typical residual norm at SITE
STEERED_GOAL = 1.10  # steered / unsteered on the same backend
HF_GOAL = 1.20  # default path (hf backend) / plain HF generate
RESULTS = Path(__file__).resolve().parent / "results" / "generation.md"

# Prompts of different lengths (a batch is left-padded); chosen so that the demo model does not
# stop at EOS within 40 tokens, so every configuration decodes the same number of steps.
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the printing press begins in",
    "Here is a detailed recipe for a classic French onion soup. First,",
    "Explain step by step how a steam engine works:",
    "My favourite hobby is gardening because",
    "In the year 2150, humanity finally",
    "The three most important things to know about black holes are",
    "Dear diary, today was",
]


@dataclass
class Config:
    name: str
    backend: str
    kind: str  # "reference", "unsteered", "steered" or "native"
    run: Callable[[], Tensor]  # returns the new tokens [batch, <= n_new]
    times: list[float] = field(default_factory=list)
    new_tokens: Tensor | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def canonical(new_tokens: Tensor, n_new: int, eos: set[int], pad: int) -> Tensor:
    """New tokens padded to ``n_new``, everything after a row's first EOS set to ``pad``."""
    return finish_after_eos(pad_to_length(new_tokens, n_new, pad), eos, pad)


def decode_steps(new_tokens: Tensor, eos: set[int]) -> int:
    """Forward steps the decoding needed: up to the last row's first EOS (inclusive)."""
    steps = 0
    for row in new_tokens.tolist():
        stop = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        steps = max(steps, stop)
    return steps


def typical_resid_norm(model: object, batch: Batch) -> float:
    """Median L2 norm of the residual stream at SITE over the real prompt positions."""
    _, store = hooks.cache(model, batch, [SITE])
    norms = store[SITE].norm(dim=-1)[batch.attention_mask.bool()]
    return float(norms.median())


def build_configs(n_new: int, batch_size: int, seed: int) -> tuple[list[Config], dict]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    models = {}
    for backend in BACKENDS:
        start = time.perf_counter()
        models[backend] = load_demo_model(backend)
        log(f"loaded {backend} in {time.perf_counter() - start:.1f}s")

    hf_model = models["hf"]
    hf_adapter = get_adapter(hf_model)
    batch = hf_adapter.encode(prompts, padding_side="left")
    prompt_len = batch.input_ids.shape[1]
    pad = hf_adapter.pad_token_id

    norm = typical_resid_norm(hf_model, batch)
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hf_adapter.d_model, generator=generator)
    vector = direction / direction.norm() * (STEER_SCALE * norm)
    steer = hooks.Steer(SITE, vector, alpha=1.0, positions=POSITIONS)

    def reference() -> Tensor:
        out = hf_model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            max_new_tokens=n_new,
            pad_token_id=pad,
        )
        return out[:, prompt_len:]

    configs = [Config("hf reference (model.generate)", "hf", "reference", reference)]
    for backend in BACKENDS:
        model = models[backend]
        for kind, interventions in (("unsteered", ()), ("steered", (steer,))):

            def run(model: object = model, interventions: tuple = interventions) -> Tensor:
                return hooks.generate(model, batch, *interventions, max_new_tokens=n_new).new_tokens

            configs.append(Config(f"{backend} hooks.generate {kind}", backend, kind, run))

    tl_model = models["transformer_lens"]
    tl_eos = sorted(eos_token_ids(None, get_adapter(tl_model).tokenizer))

    def tl_native() -> Tensor:
        with torch.no_grad():
            out = tl_model.generate(
                batch.input_ids,
                max_new_tokens=n_new,
                do_sample=False,
                use_past_kv_cache=True,
                verbose=False,
                stop_at_eos=True,
                eos_token_id=tl_eos[0] if len(tl_eos) == 1 else tl_eos,
                padding_side="left",
                return_type="tokens",
            )
        return out[:, prompt_len:]

    name = "transformer_lens native HookedTransformer.generate"
    configs.append(Config(name, "transformer_lens", "native", tl_native))
    info = {
        "prompt_len": prompt_len,
        "batch": batch_size,
        "resid_norm": norm,
        "steer_norm": float(vector.norm()),
        "eos": eos_token_ids(hf_model.generation_config, hf_adapter.tokenizer),
        "pad": pad,
    }
    return configs, info


def measure(configs: list[Config], repeats: int) -> None:
    for config in configs:
        gc.collect()
        start = time.perf_counter()
        config.new_tokens = config.run()
        log(f"warm-up {config.name}: {time.perf_counter() - start:.2f}s")
    for round_ in range(repeats):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            gc.collect()
            start = time.perf_counter()
            config.run()
            config.times.append(time.perf_counter() - start)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        log(f"round {round_ + 1}/{repeats} done (load average {load})")


def profile(configs: list[Config], name: str) -> int:
    import cProfile
    import pstats

    chosen = [c for c in configs if name in c.name]
    if not chosen:
        log(f"no configuration matches {name!r}; names: {[c.name for c in configs]}")
        return 2
    config = chosen[0]
    config.run()  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(config.run)
    log(f"profiled {config.name}: {time.perf_counter() - start:.2f}s (with profiler overhead)")
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    return 0


def fmt_ratio(value: float | None, goal: float | None) -> str:
    if value is None:
        return "-"
    if goal is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({'ok' if value <= goal else 'OVER'} <= {goal:.2f})"


def table(configs: list[Config], info: dict, n_new: int) -> tuple[str, list[str]]:
    eos, pad = info["eos"], info["pad"]
    ref = configs[0]
    assert ref.new_tokens is not None
    ref_tokens = canonical(ref.new_tokens, n_new, eos, pad)
    unsteered = {c.backend: c for c in configs if c.kind == "unsteered"}
    notes: list[str] = []
    lines = [
        "| configuration | median s | tokens/s | steered / unsteered | vs plain HF generate "
        "| spread | steps | same tokens as ref |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for config in configs:
        assert config.new_tokens is not None
        steps = decode_steps(config.new_tokens, eos)
        if steps < n_new:
            notes.append(f"{config.name} stopped at EOS after {steps} of {n_new} steps")
        tokens_per_s = info["batch"] * steps / config.median
        steered_ratio = None
        if config.kind == "steered":
            steered_ratio = config.median / unsteered[config.backend].median
        vs_hf = config.median / ref.median if config.kind != "reference" else None
        same = "-"
        if config.kind in ("unsteered", "native"):
            tokens = canonical(config.new_tokens, n_new, eos, pad)
            same = "yes" if torch.equal(tokens, ref_tokens) else "NO"
            if same == "NO":
                notes.append(f"{config.name}: greedy tokens differ from the HF reference")
        spread = (max(config.times) - min(config.times)) / config.median
        hf_goal = HF_GOAL if config.backend == "hf" else None
        lines.append(
            f"| {config.name} | {config.median:.3f} | {tokens_per_s:.1f} "
            f"| {fmt_ratio(steered_ratio, STEERED_GOAL)} | {fmt_ratio(vs_hf, hf_goal)} "
            f"| {spread:.0%} | {steps} | {same} |"
        )
    return "\n".join(lines), notes


def machine_info() -> list[str]:
    import nnsight
    import transformers

    try:
        import transformer_lens

        tl_version = getattr(transformer_lens, "__version__", None)
    except ImportError:  # pragma: no cover
        tl_version = None
    if not tl_version:
        from importlib.metadata import version

        tl_version = version("transformer_lens")
    return [
        f"- machine: {platform.machine()} {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}",
        f"- CPU count: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        f"- torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})",
        f"- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"transformer_lens {tl_version}, nnsight {nnsight.__version__}",
    ]


def write_results(
    path: Path, header: list[str], body: str, notes: list[str], machine: list[str]
) -> None:
    """Write a results file: header, table, notes, then the machine it ran on (atomically)."""
    footer = [
        "",
        *(f"Note: {note}" for note in notes),
        *([""] if notes else []),
        *machine,
        "",
    ]
    write_text(path, "\n".join([*header, body, *footer]))
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random steering vector")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine several threads per "
        "process oversubscribe the cores and make timings 5x slower and erratic; 0 keeps "
        "torch's default)",
    )
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="instead of the table: cProfile one run of the first configuration whose name "
        "contains NAME (e.g. 'bridge hooks.generate steered') and print the top functions",
    )
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1 or args.batch < 1:
        parser.error("--tokens, --repeats and --batch must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    configs, info = build_configs(args.tokens, args.batch, args.seed)
    if args.profile:
        return profile(configs, args.profile)
    load_start = os.getloadavg()
    measure(configs, args.repeats)
    body, notes = table(configs, info, args.tokens)

    print(body)
    for note in notes:
        print(f"note: {note}")
    header = [
        "# Generation benchmark",
        "",
        f"Greedy decoding of {args.tokens} new tokens, batch {args.batch} "
        f"(padded prompt length {info['prompt_len']}), demo model SmolLM2-135M-Instruct "
        "(dequantized Q4_1, fp32, CPU). Steered: one `Steer` at "
        f"`{SITE}`, positions `{POSITIONS}`, vector norm {info['steer_norm']:.2f} "
        f"(= {STEER_SCALE} x median residual norm {info['resid_norm']:.1f}). "
        f"Median of {args.repeats} interleaved repeats after one warm-up each; "
        "spread = (max - min) / median. Goals: steered / unsteered <= "
        f"{STEERED_GOAL:.2f} on every backend; `hf` backend / plain HF generate <= {HF_GOAL:.2f}.",
        "",
        f"Command: `{' '.join(['benchmarks/bench_generation.py', *(argv or sys.argv[1:])])}`",
        "",
    ]
    load = f"- load average before the timed runs: {', '.join(f'{x:.2f}' for x in load_start)}"
    write_results(args.out, header, body, notes, ["Machine:", "", *machine_info(), load])
    return 0


if __name__ == "__main__":
    sys.exit(main())
