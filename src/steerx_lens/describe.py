"""SteerX stage 3: turn a user's preference-driven spans into a short description.

The paper states that the discrete token signals are "transformed into a coherent description";
how, is this library's reconstruction. Three describers, one evidence (the top spans):

- :class:`StructuredDescriber` (the default everywhere): coherent sentences grouping the spans
  by what they are (tagged accounts, hashtags, recurring phrases, favoured words) plus habits
  measured on the user's own texts (casing, colon lead-ins, questions, exclamations, recurring
  endings, length), each with its figure or a quoted example. No model call, and no claim
  without evidence in the user's texts;
- :class:`LLMDescriber` prompts an instruct model (the demo model by default, through
  :func:`steerx_lens.hooks.generate`, greedy) or any ``str -> str`` callable with
  :data:`DESCRIBE_TEMPLATE`, filled with the top spans and a short snippet around each (a 135M
  model writes generic or invented text here: use a larger model or the structured describer);
- :class:`TemplateDescriber` lists the spans in one sentence.

:func:`description_quality` measures any describer: how often a user's description names the
user's own top spans vs other users' spans, and how many of its quoted claims occur in the
user's texts.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from steerx_lens import hooks
from steerx_lens.attribution import Span, UserAttribution
from steerx_lens.backends import get_adapter
from steerx_lens.text import chat_prompt

N_SPANS = 6
SNIPPET_CHARS = 40
MAX_DESCRIPTION_SENTENCES = 3

DESCRIBE_TEMPLATE = (
    "Below are expressions that one writer uses far more than other writers, each with a short "
    "excerpt of their text.\n\n{evidence}\n\n"
    "In one to three sentences, describe this writer's personal style and preferences "
    "(recurring phrases, sign-offs, favourite words, emoji, formatting). Do not list topics."
)
TEMPLATE_DESCRIPTION = "This user's writing is marked by recurring personal expressions: {spans}."
EMPTY_DESCRIPTION = "No preference-driven expressions stand out in this user's writing."


class Describer(Protocol):
    """Anything that writes a description from a user's attribution."""

    def __call__(self, attribution: UserAttribution) -> str: ...


def response_texts(attribution: UserAttribution) -> list[str]:
    """The user's history outputs, rebuilt from the attributed tokens."""
    return ["".join(item.tokens) for item in attribution.items]


def snippet(texts: Sequence[str], span: str, width: int = SNIPPET_CHARS) -> str | None:
    """The first occurrence of ``span`` in ``texts`` with ``width`` characters either side."""
    pattern = re.compile(re.escape(span.strip()), re.IGNORECASE)
    for text in texts:
        match = pattern.search(text)
        if match:
            start, end = max(0, match.start() - width), min(len(text), match.end() + width)
            prefix = "…" if start > 0 else ""
            suffix = "…" if end < len(text) else ""
            return prefix + " ".join(text[start:end].split()) + suffix
    return None


def evidence_lines(attribution: UserAttribution, n_spans: int = N_SPANS) -> list[str]:
    """One line per top span: ``- "span" (used N times): "…snippet…"``."""
    texts = response_texts(attribution)
    lines = []
    for span in attribution.spans[:n_spans]:
        line = f'- "{span.text.strip()}" (used {span.count} times)'
        context = snippet(texts, span.text)
        if context:
            line += f': "{context}"'
        lines.append(line)
    return lines


def first_sentences(text: str, n: int = MAX_DESCRIPTION_SENTENCES) -> str:
    """At most ``n`` sentences of ``text``, whitespace collapsed."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return " ".join(sentences[:n]).strip()


@dataclass(frozen=True)
class TemplateDescriber:
    """Deterministic description listing the top spans (no model call)."""

    n_spans: int = N_SPANS

    def __call__(self, attribution: UserAttribution) -> str:
        spans: list[Span] = attribution.spans[: self.n_spans]
        if not spans:
            return EMPTY_DESCRIPTION
        quoted = ", ".join(f'"{span.text.strip()}"' for span in spans)
        return TEMPLATE_DESCRIPTION.format(spans=quoted)


class LLMDescriber:
    """Prompt an instruct model (or any ``str -> str`` callable) for the description.

    ``llm`` is either a model of any backend of :func:`steerx_lens.backends.get_adapter` (the
    prompt is wrapped by :func:`steerx_lens.text.chat_prompt` and decoded greedily with
    :func:`steerx_lens.hooks.generate`) or any other callable taking the prompt text. An empty
    answer falls back to :class:`TemplateDescriber`.
    """

    def __init__(
        self,
        llm: Any,
        template: str = DESCRIBE_TEMPLATE,
        n_spans: int = N_SPANS,
        max_new_tokens: int = 80,
    ) -> None:
        self.llm = llm
        self.template = template
        self.n_spans = n_spans
        self.max_new_tokens = max_new_tokens

    def prompt(self, attribution: UserAttribution) -> str:
        """The filled template (before any chat formatting)."""
        return self.template.format(evidence="\n".join(evidence_lines(attribution, self.n_spans)))

    def _complete(self, prompt: str) -> str:
        try:
            tokenizer = get_adapter(self.llm).tokenizer
        except TypeError:  # BackendError (no backend supports it) or not weak-referenceable
            if not callable(self.llm):
                raise
            return str(self.llm(prompt))
        text = chat_prompt(tokenizer, prompt)
        return hooks.generate(self.llm, [text], max_new_tokens=self.max_new_tokens).texts[0]

    def __call__(self, attribution: UserAttribution) -> str:
        if not attribution.spans:
            return EMPTY_DESCRIPTION
        answer = first_sentences(self._complete(self.prompt(attribution)))
        return answer or TemplateDescriber(self.n_spans)(attribution)


_QUOTED = re.compile(r'"([^"]+)"')
_WORDS = re.compile(r"[A-Za-z][A-Za-z'’]*")
HABIT_SHARE = 0.3
"""A habit is described when at least this share of the user's texts shows it."""
TITLE_CASE_SHARE = 0.6
"""Texts count as headline-cased when this share of their words starts with a capital."""


def _join(quoted: Sequence[str]) -> str:
    """``"a"``, ``"a" and "b"``, ``"a", "b" and "c"``."""
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _quote(texts: Sequence[str]) -> list[str]:
    return [f'"{text}"' for text in texts]


def span_kind(span: str) -> Literal["retweet", "mention", "hashtag", "phrase", "word"]:
    """What a span is: a retweet marker, an @-mention, a #hashtag, a phrase or a single word."""
    text = span.strip()
    if text.startswith("RT @"):
        return "retweet"
    if text.startswith("@") and " " not in text:
        return "mention"
    if text.startswith("#") and " " not in text:
        return "hashtag"
    return "phrase" if len(text.split()) > 1 else "word"


def writing_habits(texts: Sequence[str]) -> list[str]:
    """Sentences about habits shared by at least :data:`HABIT_SHARE` of ``texts``, with the
    measured share (and always the typical length): evidence-bearing, never generic."""
    texts = [" ".join(t.split()) for t in texts if t.strip()]
    if not texts:
        return []
    n = len(texts)
    habits = []

    def share(predicate: Callable[[str], bool]) -> float:
        return sum(predicate(t) for t in texts) / n

    def title_cased(text: str) -> bool:
        words = _WORDS.findall(text)
        return (
            len(words) >= 3 and sum(w[0].isupper() for w in words) / len(words) >= TITLE_CASE_SHARE
        )

    if (value := share(title_cased)) >= HABIT_SHARE:
        habits.append(f"They capitalise most words, headline style ({value:.0%} of texts).")
    if (value := share(lambda t: ":" in t[:60])) >= HABIT_SHARE:
        habits.append(f"They often open with a colon lead-in ({value:.0%} of texts).")
    if (value := share(lambda t: "?" in t)) >= HABIT_SHARE:
        habits.append(f"They ask questions ({value:.0%} of texts).")
    if (value := share(lambda t: "!" in t)) >= HABIT_SHARE:
        habits.append(f"They use exclamation marks ({value:.0%} of texts).")
    endings = Counter(t.split()[-1].lower().strip(".,;:") for t in texts)
    ending, count = endings.most_common(1)[0]
    if ending and count >= 2 and count / n >= HABIT_SHARE:
        habits.append(f'They often end with "{ending}" ({count / n:.0%} of texts).')
    words = statistics.median(len(t.split()) for t in texts)
    habits.append(f"Their texts are typically {words:.0f} words long.")
    return habits


@dataclass(frozen=True)
class StructuredDescriber:
    """Coherent sentences from the top spans grouped by kind, the user's measured writing
    habits and one quoted example (no model call; every claim is the user's evidence)."""

    n_spans: int = N_SPANS

    def __call__(self, attribution: UserAttribution) -> str:
        spans = [span.text.strip() for span in attribution.spans[: self.n_spans]]
        spans = [span.rstrip(".,;:!?") if span_kind(span) != "phrase" else span for span in spans]
        spans = [span for span in dict.fromkeys(spans) if span]
        if not spans:
            return EMPTY_DESCRIPTION
        texts = response_texts(attribution)
        kinds: dict[str, list[str]] = {}
        for span in spans:
            kinds.setdefault(span_kind(span), []).append(span)
        sentences = []
        if "retweet" in kinds or "mention" in kinds:
            named = kinds.get("retweet", []) + kinds.get("mention", [])
            sentences.append(f"This user tags or retweets accounts such as {_join(named)}.")
        if "hashtag" in kinds:
            sentences.append(f"They use hashtags such as {_join(kinds['hashtag'])}.")
        if "phrase" in kinds:
            sentences.append(f"Recurring phrases: {_join(_quote(kinds['phrase']))}.")
        if "word" in kinds:
            sentences.append(f"Favoured words: {_join(_quote(kinds['word']))}.")
        sentences.extend(writing_habits(texts))
        example = snippet(texts, spans[0])
        if example:
            sentences.append(f'For example: "{example}"')
        return " ".join(sentences)


@dataclass(frozen=True)
class DescriptionQuality:
    """:func:`description_quality` of one describer over a population (means over users)."""

    own_spans_named: float
    """Share of a user's top spans that the user's own description names."""
    other_spans_named: float
    """Share of *another* user's top spans that the description names (mean over pairs)."""
    faithfulness: float | None
    """Share of the descriptions' claims (quoted text, @-mentions, #hashtags) found in the
    user's own texts; None when no description makes such a claim."""
    n_users: int


def _claims(description: str) -> list[str]:
    quoted = _QUOTED.findall(description)
    tagged = re.findall(r'(?<![\w"])[@#]\w+', _QUOTED.sub("", description))
    return [claim.strip("…").strip() for claim in quoted + tagged if claim.strip("…").strip()]


def _names(description: str, span: str) -> bool:
    return span.strip().lower() in description.lower()


def description_quality(
    descriptions: Mapping[str, str],
    attributions: Mapping[str, UserAttribution],
    n_spans: int = N_SPANS,
) -> DescriptionQuality:
    """How specific and faithful ``descriptions`` (user id -> text) are to ``attributions``.

    A good describer names its own user's top spans far more often than other users' (the
    "another user's description" control), and every claim it quotes occurs in the user's
    texts. Users without spans are skipped; at least two users are needed.
    """
    users = [u for u in descriptions if u in attributions and attributions[u].spans]
    if len(users) < 2:
        raise ValueError("description_quality needs at least two users with spans")
    top = {u: [s.text for s in attributions[u].spans[:n_spans]] for u in users}
    own, other, claims_found, claims_total = [], [], 0, 0
    for u in users:
        text = descriptions[u]
        own.append(sum(_names(text, s) for s in top[u]) / len(top[u]))
        other.append(
            statistics.mean(
                sum(_names(text, s) for s in top[v]) / len(top[v]) for v in users if v != u
            )
        )
        history = " ".join(" ".join(t.split()) for t in response_texts(attributions[u])).lower()
        for claim in _claims(text):
            claims_total += 1
            claims_found += " ".join(claim.split()).lower() in history
    return DescriptionQuality(
        own_spans_named=statistics.mean(own),
        other_spans_named=statistics.mean(other),
        faithfulness=claims_found / claims_total if claims_total else None,
        n_users=len(users),
    )


def make_describer(name: str, model: Any = None) -> Describer:
    """The describer called ``name``: ``"structured"`` (default), ``"template"`` or ``"llm"``
    (which prompts ``model``)."""
    if name == "structured":
        return StructuredDescriber()
    if name == "template":
        return TemplateDescriber()
    if name == "llm":
        if model is None:
            raise ValueError('describer "llm" needs a model (or any str -> str callable)')
        return LLMDescriber(model)
    raise ValueError(f"unknown describer {name!r}; known: structured, template, llm")


def describe(
    attribution: UserAttribution, describer: Describer | Callable[[UserAttribution], str]
) -> UserAttribution:
    """Fill ``attribution.description`` with the describer's output and return it."""
    attribution.description = describer(attribution)
    return attribution
