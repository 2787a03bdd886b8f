"""Cost of a sweep's cells: one call per (user, cell) vs batched rows vs shared lower blocks
(issue 12).

On the demo model and the validation items of ``--users`` health-tweet users, one layer's
fit is built once (its evidence reused), then every cell of every steered method
(``--alphas`` × ``--rs`` where r applies) is scored three ways, side by side in one run:

- **naive**: one :func:`token_nll` call per (user, cell), full passes, as a loop over cells
  would;
- **batched**: every (user, cell) row in one :func:`token_nll` call, each row steered by its
  own vector, full passes;
- **shared**: the same call where the blocks below the steering layer run once per validation
  text and every row starts at the layer (what :func:`steerx_lens.sweep.run_sweep` does on
  backends that can start a pass mid-stack).

All are also expressed in units of one unsteered NLL pass over the same validation items, and
the numbers are checked to agree (max |Δ| over cells). Run:
``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py [--users 6]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from steerx_lens.data import load_users  # noqa: E402
from steerx_lens.evaluation.cells import R_METHODS, STEERED_METHODS  # noqa: E402
from steerx_lens.evaluation.metrics import encode_for_eval, token_nll  # noqa: E402
from steerx_lens.models import load_demo_model  # noqa: E402
from steerx_lens.pipeline import SteerX, SteerXConfig  # noqa: E402
from steerx_lens.sweep import split_users  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--alphas", default="0.5,1,2")
    parser.add_argument("--rs", default="0.1,0.2")
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    rs = [float(r) for r in args.rs.split(",")]
    model = load_demo_model()
    train, validation = split_users(load_users("health_tweets", n_users=args.users), 2)
    pipeline = SteerX(model, SteerXConfig(layer=args.layer), progress=False)
    fit = pipeline.fit_many(train)
    tokenizer = pipeline.adapter.tokenizer
    texts = {u: [encode_for_eval(tokenizer, i) for i in items] for u, items in validation.items()}
    cells = [
        (m, a, r)
        for m in STEERED_METHODS
        for a in alphas
        for r in (rs if m in R_METHODS else [None])
    ]
    rows = [
        (uid, pipeline.method_vector(fit, uid, m, a, r)) for m, a, r in cells for uid in fit.users
    ]

    start = time.perf_counter()
    flat = [t for uid in fit.users for t in texts[uid]]
    token_nll(model, flat, None, batch_size=8)
    one_pass = time.perf_counter() - start

    adapter = pipeline.adapter
    adapter.can_start_mid_stack = False  # full passes for the first two ways
    start = time.perf_counter()
    naive = [token_nll(model, texts[uid], [v] * len(texts[uid]), batch_size=8) for uid, v in rows]
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    all_texts = [t for uid, _ in rows for t in texts[uid]]
    all_vectors = [v for uid, v in rows for _ in texts[uid]]
    batched_flat = token_nll(model, all_texts, all_vectors, batch_size=32)
    batched_s = time.perf_counter() - start

    adapter.can_start_mid_stack = True
    start = time.perf_counter()
    shared_flat = token_nll(model, all_texts, all_vectors, batch_size=32)
    shared_s = time.perf_counter() - start

    naive_flat = [t for per_row in naive for t in per_row]
    gap = max(
        float((a - b).abs().max())
        for other in (batched_flat, shared_flat)
        for a, b in zip(naive_flat, other, strict=True)
    )
    print(f"users {len(fit.users)}, validation items {len(flat)}, cells {len(cells)}")
    print(f"one unsteered NLL pass: {one_pass:.1f} s")
    print(f"naive   : {naive_s:.1f} s = {naive_s / one_pass:.1f} passes")
    print(f"batched : {batched_s:.1f} s = {batched_s / one_pass:.1f} passes")
    print(f"shared  : {shared_s:.1f} s = {shared_s / one_pass:.1f} passes")
    print(
        f"speed-up batched / naive {naive_s / batched_s:.2f}x, shared / naive "
        f"{naive_s / shared_s:.2f}x, shared / batched {batched_s / shared_s:.2f}x; "
        f"max |ΔNLL| {gap:.2e}"
    )


if __name__ == "__main__":
    main()
