"""A generation protocol that measures personalization (in the style of LaMP / LongLaMP).

The held-out text is generated from a *task prompt* and scored against the user's real text,
without the part the prompt already gives away:

1. **Task prompts** (:data:`TASKS`, keyed by ``user.meta["source"]``, generic fallback
   :data:`GENERIC_TASK`): the item's input framed as the task the user actually did (continue a
   tweet from its opening, write an article's opening from its headline, answer a question).
   :func:`generation_prompt` wraps it in the chat template; with a history, the user's past
   texts come first (:func:`steerx_lens.text.format_user_message`, so ``history_prompt`` gets
   the very same task). A task may *prefill* the response with the item's input (the model
   continues the user's opening instead of replying to it).
2. **Echo excluded** (:func:`scored_pair`): when the reference starts with the item's input
   (health tweets: input = the tweet's first words), only its continuation is scored; a leading
   echo of the input is stripped from the generation (case, whitespace and punctuation
   insensitive). Otherwise the overlap is mostly the echoed prompt, which every method shares.
3. **Decoding** (:data:`GREEDY`, :data:`SAMPLED`, :data:`N_SAMPLES`): greedy, and nucleus
   sampling with several seeded samples per prompt (:func:`generate_samples`), scored as the mean
   over samples.
4. **Sanity rule** (:func:`generation_informative`): ``history_prompt`` must beat ``none`` on
   ROUGE-L; if the user's own history in the prompt does not bring the generations closer to
   the user's text, the generation metrics do not measure personalization on that dataset.

The framings were chosen on validation items (``user.split_validation(2)``), never on held-out
ones; ``scripts/generation_protocol_check.py`` measures them and ``docs/generation.md`` has
the table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steerx_lens import hooks
from steerx_lens.backends.base import GENERATION_BATCH_SIZE, Decoding
from steerx_lens.data.schema import HistoryItem
from steerx_lens.evaluation.stats import SIGNIFICANCE
from steerx_lens.text import (
    PLAIN_PROMPT_TEMPLATE,
    PLAIN_RESPONSE_SEPARATOR,
    PLAIN_SYSTEM_TEMPLATE,
    chat_prompt,
    format_user_message,
    has_chat_template,
    history_block,
    recent_items,
)

__all__ = [
    "GENERATION_BATCH_SIZE",
    "GENERIC_TASK",
    "GREEDY",
    "HISTORY_BUDGET_TOKENS",
    "N_SAMPLES",
    "SAMPLED",
    "SANITY_COMPARISON",
    "TASKS",
    "Task",
    "generate_samples",
    "generation_informative",
    "generation_prompt",
    "prompt_history",
    "register_task",
    "rouge_check_significant",
    "scored_pair",
    "scored_pairs",
    "strip_echo",
    "task_for",
    "task_message",
]


# --------------------------------------------------------------------------------------------
# Task prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """How one data source's items become a generation task.

    ``template`` turns the item's input into the user message (``{input}``). ``prefill``: the
    response starts with the item's input (the model continues it; for sources whose output
    begins with the input). ``strip_echo``: remove a leading echo of the input from the
    generation before scoring. ``history_template``: the user message when a history is given
    (``{history}``: :func:`steerx_lens.text.history_block`, ``{task}``: the message without
    history); ``None`` uses :func:`steerx_lens.text.format_user_message`.
    """

    template: str
    prefill: bool = False
    strip_echo: bool = True
    history_template: str | None = None

    def message(self, item_input: str, history: Sequence[HistoryItem] | None = None) -> str:
        """The user message for ``item_input`` (with ``history``'s block when given)."""
        task = self.template.format(input=item_input.strip())
        if not history:
            return task
        if self.history_template is None:
            return format_user_message(task, history)
        return self.history_template.format(history=history_block(history), task=task)


GENERIC_TASK = Task("{input}")
"""Fallback for sources without an entry: the input itself is the request."""

TASKS: dict[str, Task] = {
    "health_tweets": Task("Complete this tweet: {input}"),
    "news_outlets": Task("Write the opening of a news article with the headline: {input}"),
    "stackexchange": Task("Answer this question:\n\n{input}"),
    "synthetic": Task("{input}"),
    "lamp": Task("{input}"),
}
"""Task per ``user.meta["source"]`` (LaMP inputs already are task instructions)."""


def register_task(source: str, task: Task) -> None:
    """Use ``task`` for items of ``source`` (replaces an existing entry)."""
    TASKS[source] = task


def task_for(source: str | None) -> Task:
    """The :class:`Task` of ``source`` (:data:`GENERIC_TASK` when unknown or ``None``)."""
    return TASKS.get(source or "", GENERIC_TASK)


def task_message(item: HistoryItem, source: str | None) -> str:
    """The item's input framed as ``source``'s task (the user message, without history)."""
    return task_for(source).message(item.input)


def generation_prompt(
    tokenizer: Any,
    item: HistoryItem,
    source: str | None,
    history: Sequence[HistoryItem] | None = None,
    system: str | None = None,
) -> str:
    """The prompt text for generating ``item``'s output under ``source``'s task.

    The user message is :func:`task_message`, with the history block in front when ``history``
    is given (:func:`steerx_lens.text.format_user_message`, or the task's
    ``history_template``), wrapped as :func:`steerx_lens.text.build_prompt` does (chat template,
    or the plain format); the item's input follows when the task prefills the response.
    Without a history and ``history_template`` this is ``build_prompt(tokenizer,
    task_message(item, source))``.
    """
    task = task_for(source)
    message = task.message(item.input, history)
    if has_chat_template(tokenizer):
        prompt = chat_prompt(tokenizer, message, system)
    else:
        prefix = PLAIN_SYSTEM_TEMPLATE.format(system=system) if system else ""
        prompt = prefix + PLAIN_PROMPT_TEMPLATE.format(input=message)
    if not task.prefill:
        return prompt
    separator = "" if has_chat_template(tokenizer) else PLAIN_RESPONSE_SEPARATOR
    return prompt + separator + item.input.strip()


HISTORY_BUDGET_TOKENS = 256
"""Tokens of history block in a ``history_prompt`` prompt (the most recent items that fit)."""


def prompt_history(
    tokenizer: Any, items: Sequence[HistoryItem], budget: int = HISTORY_BUDGET_TOKENS
) -> list[HistoryItem]:
    """The most recent ``items`` (oldest first) whose history block fits ``budget`` tokens
    (:func:`steerx_lens.text.recent_items` with the protocol's budget)."""
    return recent_items(tokenizer, items, budget)


# --------------------------------------------------------------------------------------------
# Echo excluded
# --------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W_]+")
"""A word for echo matching: a run of letters/digits (punctuation, ``#``, ``@``, ``_`` ignored)."""
_LEADING_PUNCT = ".,;:!?-–—…\"')]}»”’"
"""Punctuation that closes the echoed prefix (dropped from the start of the rest)."""


def strip_echo(text: str, prefix: str) -> str | None:
    """``text`` after a leading occurrence of ``prefix``'s words, or ``None`` if it has none.

    Words are compared case-insensitively; whitespace and punctuation between and around them
    are ignored, so ``"RT @x: Ebola  outbreak"`` starts with ``"rt x ebola outbreak"``. The
    rest is returned without the whitespace and punctuation that lead it (a word-less prefix
    matches nothing).
    """
    wanted = [word.lower() for word in _WORD_RE.findall(prefix)]
    if not wanted:
        return None
    end = 0
    matches = _WORD_RE.finditer(text)
    for word in wanted:
        match = next(matches, None)
        if match is None or match.group().lower() != word:
            return None
        end = match.end()
    rest = text[end:]
    return rest.lstrip(" \t\r\n" + _LEADING_PUNCT)


def scored_pair(item: HistoryItem, generated: str, source: str | None = None) -> tuple[str, str]:
    """(prediction, reference) to score for one generation of ``item``: the prompt excluded.

    Reference: the item's output, or only its continuation when it starts with the item's
    input (the input is given in the prompt). Prediction: the generation without a leading
    echo of the input (unless ``source``'s task sets ``strip_echo=False``). Both stripped.
    """
    reference = item.output.strip()
    continuation = strip_echo(reference, item.input)
    if continuation is not None:
        reference = continuation.strip()
    prediction = generated.strip()
    if task_for(source).strip_echo:
        rest = strip_echo(prediction, item.input)
        if rest is not None:
            prediction = rest.strip()
    return prediction, reference


def scored_pairs(
    items: Sequence[HistoryItem], generated: Sequence[str], source: str | None = None
) -> tuple[list[str], list[str]]:
    """:func:`scored_pair` of every item: (predictions, references) for ``generation_scores``."""
    pairs = [scored_pair(i, g, source) for i, g in zip(items, generated, strict=True)]
    return [p for p, _ in pairs], [r for _, r in pairs]


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

GREEDY = Decoding()
"""Greedy decoding: the protocol's main setting (deterministic)."""
SAMPLED = Decoding(do_sample=True, temperature=0.7, top_p=0.9, seed=0)
"""Nucleus sampling (temperature 0.7, top-p 0.9); sample ``k`` uses seed ``seed + k``."""
N_SAMPLES = 4
"""Samples per prompt in the sampled setting (scores are averaged over them)."""


def generate_samples(
    model: Any,
    prompts: Sequence[str],
    *interventions: hooks.InterventionLike,
    max_new_tokens: int = 40,
    decoding: Decoding = GREEDY,
    n_samples: int = N_SAMPLES,
    tokenizer: Any = None,
) -> list[list[str]]:
    """Generated texts per sample: ``[sample][prompt]`` (one sample when greedy).

    Sample ``k`` is one :func:`steerx_lens.hooks.generate` call over all prompts with seed
    ``decoding.seed + k``, so the texts are reproducible for a seed and batch.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    seeds = range(n_samples) if decoding.do_sample else range(1)
    out = []
    for k in seeds:
        run = decoding.with_seed(decoding.seed + k) if decoding.do_sample else None
        generation = hooks.generate(
            model,
            list(prompts),
            *interventions,
            max_new_tokens=max_new_tokens,
            tokenizer=tokenizer,
            decoding=run,
        )
        out.append([text.strip() for text in generation.texts])
    return out


# --------------------------------------------------------------------------------------------
# Sanity rule
# --------------------------------------------------------------------------------------------


def _rouge_l(value: Any) -> float:
    """A ROUGE-L value from a number, a mapping or an object with ``rougeL`` (a list of
    per-item values is averaged)."""
    if isinstance(value, Mapping):
        value = value["rougeL"]
    elif not isinstance(value, (int, float)):
        value = value.rougeL
    if isinstance(value, Sequence):
        if not value:
            raise ValueError("no ROUGE-L values")
        return float(sum(value) / len(value))
    return float(value)


SANITY_COMPARISON = ("history_prompt", "none", "rougeL")
"""The sanity rule's comparison (a, b, metric): does the user's history in the prompt raise
ROUGE-L over no steering?"""


def generation_informative(
    scores_by_method: Mapping[str, Any],
    dataset: str | None = None,
    paired: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """Whether the generation metrics measure personalization: ``history_prompt`` must beat
    ``none`` on ROUGE-L.

    ``scores_by_method`` maps method names to ROUGE-L values, or to objects/mappings with a
    ``rougeL`` (a number, or per-item values that are averaged). ``paired`` is the evaluation's
    comparison :data:`SANITY_COMPARISON` over users (``mean``, ``n_positive``, ``n_users``,
    ``wilcoxon_p``): the message then says whether that difference is significant at p < 0.05,
    since a point difference alone also passes on noise. Returns (ok, a one-line message);
    ``ok`` is the point rule.
    """
    where = f" on {dataset}" if dataset else ""
    missing = [m for m in ("none", "history_prompt") if scores_by_method.get(m) is None]
    if missing:
        return False, (
            f"cannot check the generation metrics{where}: no {' or '.join(missing)} scores"
        )
    none = _rouge_l(scores_by_method["none"])
    prompted = _rouge_l(scores_by_method["history_prompt"])
    evidence = "" if paired is None else _paired_evidence(paired)
    if prompted > none:
        return True, (
            f"generation metrics informative{where}: history_prompt ROUGE-L {prompted:.1f} > "
            f"none {none:.1f}{evidence}"
        )
    return False, (
        f"generation metrics uninformative{where}: history_prompt ROUGE-L {prompted:.1f} <= "
        f"none {none:.1f}, so the user's own history does not bring generations closer to the "
        f"user's text; do not read ROUGE/BLEU as personalization here{evidence}"
    )


def rouge_check_significant(paired: Mapping[str, Any]) -> bool:
    """Whether ``history_prompt`` beats ``none`` on ROUGE-L over users at Wilcoxon p < 0.05."""
    p = paired.get("wilcoxon_p")
    return p is not None and p < SIGNIFICANCE and paired["mean"] > 0


def _paired_evidence(paired: Mapping[str, Any]) -> str:
    """The message's clause on the paired comparison behind the point rule."""
    p = paired.get("wilcoxon_p")
    shown = "no test" if p is None else f"Wilcoxon p {p:.2g}"
    head = (
        f" (paired over users: history_prompt ahead for {paired['n_positive']} of "
        f"{paired['n_users']}, {shown}"
    )
    if rouge_check_significant(paired):
        return head + ")"
    return head + (
        ", not significant: ROUGE-L does not detect even history in the prompt here, so a "
        "ROUGE-L difference between vectors is weak evidence either way)"
    )
