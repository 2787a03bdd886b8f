"""The main job's three batching choices, each against what it replaced, side by side (issue 12).

On the demo model and ``--users`` health-tweet accounts, in one run:

- **model answers ŷ**: every user's history prompts decoded in length-sorted batches of
  :data:`GENERATION_BATCH_SIZE` (what ``SteerX.build_population`` does) vs one user at a time in
  batches of 8 (before);
- **evaluation generations**: ``--methods`` methods' held-out task prompts, each row steered by
  its own vector, in shared length-sorted batches vs one generation call per method (before);
- **scoring**: the attribution rows (leave-one-out history + item) scored with the logits of
  the response positions only (``hooks.score_tokens(last=)``) vs every position (before).

Each line gives both wall times, their ratio and whether the results agree (same ŷ / texts;
max |Δ log p| for scoring). Run: ``OMP_NUM_THREADS=1 .venv/bin/python
benchmarks/bench_main_job.py [--users 4 --methods 6]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from steerx_lens import hooks  # noqa: E402
from steerx_lens.attribution.sequences import prepare_items  # noqa: E402
from steerx_lens.backbones.mean_diff import model_answers  # noqa: E402
from steerx_lens.backends import get_adapter  # noqa: E402
from steerx_lens.backends.base import GENERATION_BATCH_SIZE  # noqa: E402
from steerx_lens.data import load_users  # noqa: E402
from steerx_lens.evaluation.generation import generation_prompt  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.text import build_prompt, pad_batch  # noqa: E402


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def report(name: str, before: float, after: float, agreement: str) -> None:
    print(
        f"{name:<24} before {before:6.1f} s  after {after:6.1f} s  "
        f"speed-up {before / after:4.2f}x  {agreement}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--methods", type=int, default=6, help="steered methods to generate")
    parser.add_argument("--layer", type=int, default=12)
    args = parser.parse_args()
    model = load_demo_model()
    adapter = get_adapter(model)
    tokenizer = adapter.tokenizer
    users = load_users("health_tweets", n_users=args.users)
    print(
        f"torch threads {torch.get_num_threads()}, {args.users} users, "
        f"generation batch {GENERATION_BATCH_SIZE}"
    )

    # ŷ: per user in batches of 8 vs every user's prompts together
    per_user = [[build_prompt(tokenizer, item.input) for item in u.history] for u in users]
    before, old = timed(lambda: [model_answers(model, p, batch_size=8) for p in per_user])
    after, new = timed(lambda: model_answers(model, [p for ps in per_user for p in ps]))
    same = sum(a == b for a, b in zip([a for o in old for a in o], new, strict=True))
    report("model answers ŷ", before, after, f"{same}/{len(new)} answers identical")

    # generations: one call per method vs the methods' rows in shared batches
    site = f"blocks.{args.layer}.hook_resid_post"
    generator = torch.Generator().manual_seed(0)
    prompts = [generation_prompt(tokenizer, i, "health_tweets") for u in users for i in u.heldout]
    vectors = [torch.randn(adapter.d_model, generator=generator) for _ in range(args.methods)]

    def steer(rows: list[torch.Tensor]) -> hooks.Steer:
        return hooks.Steer(site, torch.stack(rows), 1.0, "prompt_last_and_generated")

    def per_method() -> list[str]:
        return [
            t
            for v in vectors
            for t in hooks.generate(model, prompts, steer([v] * len(prompts))).texts
        ]

    def shared() -> list[str]:
        rows = [(p, v) for v in vectors for p in prompts]
        out: list[str] = []
        for start in range(0, len(rows), GENERATION_BATCH_SIZE):
            chunk = rows[start : start + GENERATION_BATCH_SIZE]
            batch = hooks.generate(model, [p for p, _ in chunk], steer([v for _, v in chunk]))
            out.extend(batch.texts)
        return out

    before, old_texts = timed(per_method)
    after, new_texts = timed(shared)
    same = sum(a == b for a, b in zip(old_texts, new_texts, strict=True))
    report("evaluation generations", before, after, f"{same}/{len(new_texts)} texts identical")

    # scoring: every position's logits vs the responses' only
    rows = [row for u in users for row in prepare_items(tokenizer, u)]
    batches = [rows[i : i + 8] for i in range(0, len(rows), 8)]

    def score(tail: bool) -> list[torch.Tensor]:
        out = []
        for batch in batches:
            padded = pad_batch(batch, adapter.pad_token_id)
            last = max(len(r.input_ids) - r.response_start for r in batch) if tail else None
            logp = hooks.score_tokens(model, padded.inputs, last=last).logp
            out.append(logp[padded.response[:, 1:]])
        return out

    before, full = timed(lambda: score(False))
    after, tail = timed(lambda: score(True))
    gap = max(float((a - b).abs().max()) for a, b in zip(full, tail, strict=True))
    tokens = sum(len(r.input_ids) for r in rows)
    report("attribution scoring", before, after, f"max |Δ log p| {gap:.1e} ({tokens} tokens)")


if __name__ == "__main__":
    main()
