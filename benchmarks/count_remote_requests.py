"""Count the remote requests (nnsight traces) each SteerX stage makes, per user.

Runs the pipeline through nnsight's offline simulation of remote execution (``remote="local"``)
and counts the requests that simulation receives: each would be one NDIF job. The counts depend
on the number of users, history items and ``batch_size``, not on the model, so the tiny random
model is used. Usage: ``python benchmarks/count_remote_requests.py [--users 6 --history 8]``.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nnsight.intervention.backends.local import LocalSimulationBackend

from steerx_lens.atomic import write_text
from steerx_lens.backends import get_adapter
from steerx_lens.data import make_synthetic_users
from steerx_lens.evaluation.metrics import encode_for_eval, token_nll
from steerx_lens.models import load_tiny_model
from steerx_lens.pipeline import SteerX, SteerXConfig

REQUESTS: Counter[str] = Counter()
_stage = {"name": "other"}
_original_call = LocalSimulationBackend.__call__


def _counting_call(self: LocalSimulationBackend, tracer: object) -> None:
    REQUESTS[_stage["name"]] += 1
    _original_call(self, tracer)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Attribute the requests made inside the block to ``name``."""
    previous, _stage["name"] = _stage["name"], name
    try:
        yield
    finally:
        _stage["name"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--history", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/remote_requests.md")
    args = parser.parse_args()

    LocalSimulationBackend.__call__ = _counting_call  # type: ignore[method-assign]
    model = load_tiny_model("nnsight")
    get_adapter(model, remote="local")
    users = make_synthetic_users(
        n_users=args.users, n_history=args.history, n_heldout=args.heldout, seed=0
    )
    # swap_threshold 0: every user gets minimal pairs (the random tiny model has tiny effects)
    config = SteerXConfig(layer=1, answer_tokens=8, batch_size=args.batch_size, swap_threshold=0.0)
    pipeline = SteerX(model, config, progress=False)
    with stage("population: model answers + baseline vectors + shared vector"):
        population = pipeline.build_population(users)
    fits = {}
    for user in users:
        with stage("attribution (patch effects, K=2 counterfactuals)"):
            attribution = pipeline.attribute(user, population)
        with stage("SteerX vector (minimal pairs)"):
            fits[user.user_id] = pipeline.steerx_vector(user, attribution, population)
    tokenizer = pipeline.adapter.tokenizer
    texts = [encode_for_eval(tokenizer, item) for user in users for item in user.heldout]
    vectors = [fits[user.user_id][0] for user in users for _ in user.heldout]
    with stage("held-out NLL, all users' rows batched (one method)"):
        token_nll(model, texts, vectors, batch_size=args.batch_size)
    prompts = [item.input for user in users for item in user.heldout]
    with stage("steered generation, all users' rows batched (one call)"):
        pipeline.generate(prompts, vectors, max_new_tokens=4)

    lines = [
        f"Remote requests per stage ({args.users} users, {args.history} history items and "
        f"{args.heldout} held-out items each, batch_size {args.batch_size}; counted with "
        "`python benchmarks/count_remote_requests.py`):",
        "",
        "| stage | requests | per user |",
        "|---|---:|---:|",
    ]
    for name, count in REQUESTS.items():
        lines.append(f"| {name} | {count} | {count / args.users:.1f} |")
    total = sum(REQUESTS.values())
    lines.append(f"| **total** | **{total}** | **{total / args.users:.1f}** |")
    table = "\n".join(lines) + "\n"
    write_text(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
