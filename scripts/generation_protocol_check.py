"""Does the generation protocol measure personalization? ``none`` vs ``history_prompt`` ROUGE-L.

On VALIDATION items only (per user, ``user.split_validation(2)``: the last 2 items of
``user.history``; ``user.heldout`` is never read), with the offline demo model
(SmolLM2-135M-Instruct on the hf backend), for each dataset and protocol:

- ``old``: ``text.build_prompt(item.input)`` and whole texts scored (generation vs output);
- ``new``: :func:`steerx_lens.evaluation.generation.generation_prompt` (task prompt) and
  :func:`~steerx_lens.evaluation.generation.scored_pair` (prompt excluded from both sides).

``none`` has no history; ``history_prompt`` has the user's remaining history (the most recent
items whose block fits 256 tokens) in the prompt. Prints a Markdown table: mean ROUGE-L / ROUGE-1
(rouge-score, stemmed, as the evaluation's metrics), the difference and the share of items where
``history_prompt`` scores higher (ties half). Generations are cached in ``--cache`` (by prompt
and decoding), so trying another framing only generates what changed.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/generation_protocol_check.py
    ... --framing prefill --datasets health_tweets   # an alternative framing
    ... --sampled health_tweets                       # + the sampled setting on one dataset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from steerx_lens.backends import get_adapter
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.data.sources import load_users
from steerx_lens.evaluation import generation as gp
from steerx_lens.models import load_demo_model
from steerx_lens.text import build_prompt

DATASETS = {
    # name: (load_users source, meta source, n_users)
    "health_tweets": ("health_tweets", "health_tweets", 16),
    "news_outlets": ("news_outlets", "news_outlets", 9),
    "stackexchange": ("stackexchange_beer", "stackexchange", 6),
    "synthetic": ("synthetic", "synthetic", 6),
}
STYLE = (
    "Here are previous texts by this user:\n{history}\n\n"
    "Write in the same style as these texts. {task}"
)
FRAMINGS: dict[str, dict[str, gp.Task]] = {
    "default": {},
    # alternatives tried on the validation items (see docs/generation.md)
    "prefill": {"health_tweets": gp.Task("Complete this tweet: {input}", prefill=True)},
    "style": {
        source: replace(gp.task_for(source), history_template=STYLE)
        for source in ("health_tweets", "news_outlets", "stackexchange", "synthetic")
    },
}


def validation_rows(
    users: list[UserHistory], tokenizer: object
) -> list[tuple[str, HistoryItem, list[HistoryItem]]]:
    """(user id, validation item, prompt history from the user's remaining history)."""
    rows = []
    for user in users:
        train, validation = user.split_validation(2)
        history = gp.prompt_history(tokenizer, train)
        rows += [(user.user_id, item, history) for item in validation]
    return rows


class Generator:
    """Batched greedy/sampled generation with a JSON cache keyed by prompt and decoding."""

    def __init__(self, model: object, cache: Path, max_new_tokens: int, batch_size: int):
        self.model, self.cache_path = model, cache
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.cache: dict[str, str] = json.loads(cache.read_text()) if cache.exists() else {}

    def key(self, prompt: str, decoding: gp.Decoding, k: int) -> str:
        spec = f"{self.max_new_tokens}|{decoding}|{k}|{prompt}"
        return hashlib.sha256(spec.encode()).hexdigest()[:24]

    def __call__(
        self, prompts: list[str], decoding: gp.Decoding = gp.GREEDY, n_samples: int = 1
    ) -> list[list[str]]:
        """``[sample][prompt]`` texts. Sampled batches are fixed (prompt order, batch size), so
        the cache holds the texts a rerun would give."""
        samples = n_samples if decoding.do_sample else 1
        out: list[list[str]] = []
        for k in range(samples):
            keys = [self.key(p, decoding, k) for p in prompts]
            todo = sorted({i for i, key in enumerate(keys) if key not in self.cache})
            if decoding.do_sample:  # keep sampled batches fixed: regenerate all or nothing
                todo = list(range(len(prompts))) if todo else []
            else:  # greedy: group by length (less padding; rows are independent)
                todo.sort(key=lambda i: len(prompts[i]))
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                run = decoding.with_seed(decoding.seed + k) if decoding.do_sample else gp.GREEDY
                texts = gp.generate_samples(
                    self.model,
                    [prompts[i] for i in chunk],
                    max_new_tokens=self.max_new_tokens,
                    decoding=run,
                    n_samples=1,
                )[0]
                for i, text in zip(chunk, texts, strict=True):
                    self.cache[keys[i]] = text
                self.cache_path.write_text(json.dumps(self.cache))
            out.append([self.cache[key] for key in keys])
        return out


def rouge_per_item(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per item ROUGE-1 / ROUGE-L F1 in [0, 100] (``rouge-score``, stemmed: as the evaluation's
    generation metrics)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rougeL": []}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        out["rouge1"].append(100.0 * scores["rouge1"].fmeasure)
        out["rougeL"].append(100.0 * scores["rougeL"].fmeasure)
    return out


def evaluate(
    name: str,
    rows: list[tuple[str, HistoryItem, list[HistoryItem]]],
    source: str,
    generate: Generator,
    tokenizer: object,
    protocol: str,
    decoding: gp.Decoding,
    n_samples: int,
    examples: int,
) -> dict[str, object]:
    items = [item for _, item, _ in rows]
    result: dict[str, object] = {"dataset": name, "protocol": protocol, "n": len(items)}
    per_item: dict[str, list[float]] = {}
    for method in ("none", "history_prompt"):
        prompts = []
        for _, item, history in rows:
            h = history if method == "history_prompt" else None
            if protocol == "old":
                prompts.append(build_prompt(tokenizer, item.input, h))
            else:
                prompts.append(gp.generation_prompt(tokenizer, item, source, h))
        samples = generate(prompts, decoding, n_samples)
        r1, rl, item_rl = [], [], [0.0] * len(items)
        for texts in samples:
            if protocol == "old":
                preds, refs = texts, [item.output for item in items]
            else:
                preds, refs = gp.scored_pairs(items, texts, source)
            scores = rouge_per_item(preds, refs)
            r1.append(sum(scores["rouge1"]) / len(items))
            rl.append(sum(scores["rougeL"]) / len(items))
            for i, value in enumerate(scores["rougeL"]):
                item_rl[i] += value / len(samples)
            if examples and texts is samples[0]:
                for i in range(0, len(items), max(1, len(items) // examples)):
                    print(
                        f"[{name}/{protocol}/{method}] in={items[i].input[:60]!r}\n"
                        f"   pred={preds[i][:160]!r}\n   ref ={refs[i][:160]!r}",
                        file=sys.stderr,
                    )
        result[method] = {"rougeL": sum(rl) / len(rl), "rouge1": sum(r1) / len(r1)}
        per_item[method] = item_rl
    wins = sum(
        1.0 if h > n else 0.5 if h == n else 0.0
        for h, n in zip(per_item["history_prompt"], per_item["none"], strict=True)
    )
    result["win_rate"] = wins / len(items)
    result["informative"] = gp.generation_informative(
        {m: result[m] for m in ("none", "history_prompt")}, name
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--protocols", nargs="*", default=["old", "new"])
    parser.add_argument("--framing", default="default", choices=sorted(FRAMINGS))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sampled", nargs="*", default=[], help="datasets to also sample")
    parser.add_argument("--n-samples", type=int, default=gp.N_SAMPLES)
    parser.add_argument("--examples", type=int, default=0, help="print N examples per cell")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/steerx_generation_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for source, task in FRAMINGS[args.framing].items():
        gp.register_task(source, task)

    model = load_demo_model("hf")
    tokenizer = get_adapter(model).tokenizer
    generate = Generator(model, args.cache, args.max_new_tokens, args.batch_size)
    results = []
    for name in args.datasets:
        loader, source, n_users = DATASETS[name]
        users = load_users(loader)[:n_users]
        rows = validation_rows(users, tokenizer)
        settings = [("greedy", gp.GREEDY, 1)]
        if name in args.sampled:
            settings.append(("sampled", gp.SAMPLED, args.n_samples))
        for protocol in args.protocols:
            for label, decoding, n in settings:
                if protocol == "old" and label == "sampled":
                    continue
                start = time.time()
                result = evaluate(
                    name,
                    rows,
                    source,
                    generate,
                    tokenizer,
                    protocol,
                    decoding,
                    n,
                    args.examples,
                )
                result["decoding"] = label
                results.append(result)
                print(
                    f"done {name}/{protocol}/{label} in {time.time() - start:.0f}s",
                    file=sys.stderr,
                )

    sampled = f"T={gp.SAMPLED.temperature}, top-p={gp.SAMPLED.top_p}, {args.n_samples} seeds"
    print(f"\nframing: {args.framing}; max_new_tokens {args.max_new_tokens}; sampled: {sampled}\n")
    print(
        "| dataset | protocol | decoding | items | none R-L | history R-L | Δ R-L | "
        "none R-1 | history R-1 | history wins | informative |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        none, hist = r["none"], r["history_prompt"]
        ok = "yes" if r["informative"][0] else "**no**"
        print(
            f"| {r['dataset']} | {r['protocol']} | {r['decoding']} | {r['n']} | "
            f"{none['rougeL']:.1f} | {hist['rougeL']:.1f} | "
            f"{hist['rougeL'] - none['rougeL']:+.1f} | {none['rouge1']:.1f} | "
            f"{hist['rouge1']:.1f} | {r['win_rate']:.0%} | {ok} |"
        )


if __name__ == "__main__":
    main()
