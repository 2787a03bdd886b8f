"""SteerX stage 3: turn a user's preference-driven spans into a short description.

The paper states that the discrete token signals are "transformed into a coherent description";
the prompt and post-processing here are this library's reconstruction. Two describers:

- :class:`LLMDescriber` prompts an instruct model (the demo model by default, through
  :func:`steerx_lens.hooks.generate`, greedy) or any ``str -> str`` callable with
  :data:`DESCRIBE_TEMPLATE`, filled with the top spans and a short snippet around each;
- :class:`TemplateDescriber` writes a deterministic sentence from the same spans (no model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


def describe(
    attribution: UserAttribution, describer: Describer | Callable[[UserAttribution], str]
) -> UserAttribution:
    """Fill ``attribution.description`` with the describer's output and return it."""
    attribution.description = describer(attribution)
    return attribution
