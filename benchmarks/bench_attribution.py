"""Speed and planted-marker recovery of ``steerx_lens.attribution`` on the demo model.

For synthetic users with planted markers (``data.make_synthetic_users``), runs
:func:`steerx_lens.attribution.attribute_user` with ``method="patch"`` (default: other users'
contexts, K=2) and ``method="prompt"``, and reports per user: seconds, scored tokens per
second, and precision@k of the top spans against the planted markers (k = number of markers).
A plain forward pass over the same number of tokens is timed alongside (same batch shape), so
the overhead of the attribution code over the model itself can be read even when other
processes load the machine.

Run: ``.venv/bin/python benchmarks/bench_attribution.py [--users 4] [--history 4] [--k 2]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from steerx_lens import hooks  # noqa: E402
from steerx_lens.attribution import (  # noqa: E402
    AttributionConfig,
    UserAttribution,
    attribute_user,
    prepare_items,
)
from steerx_lens.attribution.config import DEFAULT_BATCH_SIZE  # noqa: E402
from steerx_lens.data import UserHistory, make_synthetic_users  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402


def precision_at_k(attribution: UserAttribution, markers: list[str]) -> float:
    """Share of the top-k spans (k = number of markers) contained in / containing a marker."""
    top = [span.text.casefold() for span in attribution.spans[: len(markers)]]
    folded = [marker.casefold() for marker in markers]
    return sum(any(s in m or m in s for m in folded) for s in top) / len(markers)


def forward_seconds(model: object, n_rows: int, length: int) -> float:
    """One plain forward of ``n_rows`` x ``length`` tokens in batches of the default size."""
    ids = torch.full((min(n_rows, DEFAULT_BATCH_SIZE), length), 100)
    start = time.perf_counter()
    for _ in range(0, n_rows, DEFAULT_BATCH_SIZE):
        with torch.no_grad():
            hooks.run(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return time.perf_counter() - start


def rows_per_user(user: UserHistory, method: str, k: int) -> int:
    """Forward rows one attribution runs: clean rows + counterfactual rows."""
    return len(user.history) * (1 + (1 if method == "prompt" else k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--history", type=int, default=4)
    parser.add_argument("--k", type=int, default=2, help="counterfactual users per item")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_demo_model("hf")
    users = make_synthetic_users(n_users=args.users, n_history=args.history, seed=0)
    print(f"demo model, {args.users} users x {args.history} items, K={args.k}, CPU fp32")
    print("| method | user | s | tokens/s | plain fwd s | p@k |")
    print("|---|---|---|---|---|---|")
    for method in ("patch", "prompt"):
        seconds, precisions = [], []
        for user in users:
            lengths = [len(s.input_ids) for s in prepare_items(model.tokenizer, user)]
            n_rows = rows_per_user(user, method, args.k)
            start = time.perf_counter()
            config = AttributionConfig(method=method, k_counterfactual=args.k)
            result = attribute_user(model, user, users, config)
            elapsed = time.perf_counter() - start
            baseline = forward_seconds(model, n_rows, max(lengths))
            precision = precision_at_k(result, user.meta["markers"])
            tokens = n_rows * statistics.mean(lengths)
            seconds.append(elapsed)
            precisions.append(precision)
            print(
                f"| {method} | {user.user_id} | {elapsed:.1f} | {tokens / elapsed:.0f} | "
                f"{baseline:.1f} | {precision:.2f} |"
            )
        print(
            f"| {method} | median / mean | {statistics.median(seconds):.1f} | | | "
            f"{statistics.mean(precisions):.3f} |"
        )


if __name__ == "__main__":
    main()
