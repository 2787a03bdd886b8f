"""Words and bigrams distinctive of a user's history, by a model-free statistic: the tokens behind
``nll_distinct``, a preference-token mask that SteerX's estimator has no part in.

The statistic is the log-odds ratio with an informative Dirichlet prior of Monroe, Colaresi &
Quinn (2008, "Fightin' Words", *Political Analysis* 16(4)). For user ``i`` and term ``w``, against
the pooled histories of all other users ``j``::

    δ_w = log((y_iw + a_w) / (n_i + a_0 - y_iw - a_w)) - log((y_jw + a_w) / (n_j + a_0 - y_jw - a_w))
    σ²_w = 1 / (y_iw + a_w) + 1 / (y_jw + a_w)          z_w = δ_w / sqrt(σ²_w)

``y`` are the term's counts, ``n`` the totals, and the prior ``a_w = prior_strength × (count of w
in all users' histories)``, ``a_0 = Σ_w a_w``. The prior shrinks rare terms towards the
population rate; its strength sets how many uses make a term distinctive. At full strength (1,
the pooled counts themselves) it outweighs histories of a dozen short items: 11 of the 16
health-tweet accounts get no distinctive term. :data:`DISTINCT_PRIOR_STRENGTH` (0.1) is the
value where a term that only one user writes passes ``z > 1.96`` soonest, from its 3rd use among
9-16 users of similar size (4th at 1, 6th-7th at 2, 8th-9th at 0.01); at 2 uses its ``z`` is 1.7-1.8.
A positive ``z`` = the user uses the term more than the others do. Each n-gram order is its own
multinomial (unigrams against unigrams, bigrams against bigrams).

Tokens (:func:`tokenize`) are lowercased words (with their apostrophes: "don't"; initialisms
such as "U.S." whole), and, each as its own token because style lives there, hashtags,
@mentions, URLs, emoji and runs of punctuation ("...", "?!", ":"). Bigrams are pairs of adjacent tokens of one text.

Everything is a pure function of texts: the terms come from the users' history texts only, are
fixed before any vector is fitted, and the held-out texts only receive spans
(:func:`distinct_char_spans`) that :func:`token_mask_from_spans` turns into a token mask.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from steerx_lens.data.schema import UserHistory

DISTINCT_Z = 1.96
"""Default threshold: terms with ``z`` above it are distinctive (the two-sided 5 % critical value
of a standard normal)."""
DISTINCT_PRIOR_STRENGTH = 0.1
"""Default prior strength: the prior's pseudo-counts are this fraction of the pooled counts (the
module docstring says why)."""

_EMOJI = "[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff]"
_EMOJI_MODIFIER = "[\ufe0f\U0001f3fb-\U0001f3ff]"
_TOKEN_RE = re.compile(
    r"\S+://\S+"  # a URL, whole
    r"|[#@]\w+"  # a hashtag or an @mention
    r"|(?:[^\W\d_]\.){2,}"  # an initialism ("U.S.")
    r"|\w+(?:['’]\w+)*"  # a word, with its apostrophes
    rf"|{_EMOJI}{_EMOJI_MODIFIER}*(?:\u200d{_EMOJI}{_EMOJI_MODIFIER}*)*"  # one emoji
    rf"|(?:(?!{_EMOJI})[^\w\s])+"  # a run of punctuation or symbols
)


class Token(NamedTuple):
    """A token of :func:`tokenize`: its lowercased text and its ``[start, end)`` characters."""

    text: str
    start: int
    end: int


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into lowercased words, hashtags, @mentions, URLs, emoji and punctuation
    runs (the module docstring), with their character offsets."""
    return [Token(m.group().lower(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


def _ngrams(tokens: Sequence[str], n: int) -> list[str]:
    """The ``n``-grams of a token sequence, as its tokens joined by single spaces."""
    return [" ".join(tokens[k : k + n]) for k in range(len(tokens) - n + 1)]


def _check(ngram: tuple[int, int], n_users: int, prior_strength: float) -> None:
    if not 1 <= ngram[0] <= ngram[1]:
        raise ValueError(f"ngram must be (min_n, max_n) with 1 <= min_n <= max_n, got {ngram}")
    if n_users < 2:
        raise ValueError(f"distinctive terms need at least 2 users, got {n_users}")
    if not prior_strength > 0:
        raise ValueError(f"prior_strength must be positive, got {prior_strength}")


def _order_scores(
    tokens: Sequence[Sequence[Sequence[str]]], n: int, prior_strength: float
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Terms of order ``n`` (sorted), their counts ``[user, term]`` and z-scores ``[user, term]``
    of Monroe et al.'s weighted log-odds of each user against all the others."""
    counters = [Counter(g for text in texts for g in _ngrams(text, n)) for texts in tokens]
    terms = sorted(set().union(*counters))
    counts = np.array([[c[t] for t in terms] for c in counters], dtype=np.int64).reshape(
        len(counters), len(terms)
    )
    if len(terms) < 2:  # one term type holds every count: nothing can be distinctive
        return terms, counts, np.zeros(counts.shape)
    pooled = counts.sum(axis=0)
    totals = counts.sum(axis=1, keepdims=True)
    y_i, y_j = counts.astype(float), (pooled - counts).astype(float)
    n_i, n_j = totals.astype(float), float(pooled.sum()) - totals
    a_w = prior_strength * pooled.astype(float)
    a_0 = a_w.sum()
    delta = np.log((y_i + a_w) / (n_i + a_0 - y_i - a_w)) - np.log(
        (y_j + a_w) / (n_j + a_0 - y_j - a_w)
    )
    return terms, counts, delta / np.sqrt(1 / (y_i + a_w) + 1 / (y_j + a_w))


def _scores(
    users_histories: Mapping[str, Sequence[str]], ngram: tuple[int, int], prior_strength: float
) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """:func:`_order_scores` for each order of ``ngram``, users in the mapping's order."""
    _check(ngram, len(users_histories), prior_strength)
    tokens = [
        [[t.text for t in tokenize(text)] for text in texts] for texts in users_histories.values()
    ]
    return [_order_scores(tokens, n, prior_strength) for n in range(ngram[0], ngram[1] + 1)]


def log_odds_z(
    users_histories: Mapping[str, Sequence[str]],
    *,
    ngram: tuple[int, int] = (1, 2),
    prior_strength: float = DISTINCT_PRIOR_STRENGTH,
) -> dict[str, dict[str, float]]:
    """Per user: ``term -> z`` for every term of any user's history (negative = the user uses
    it less than the others), by the statistic of the module docstring.

    ``users_histories`` maps each user to their history texts; ``ngram = (min_n, max_n)`` are the
    term lengths in tokens. The result does not depend on the order of the users.
    """
    result: dict[str, dict[str, float]] = {user: {} for user in users_histories}
    for terms, _, z in _scores(users_histories, ngram, prior_strength):
        for row, user in enumerate(users_histories):
            result[user].update(zip(terms, z[row].tolist(), strict=True))
    return result


def distinctive_terms(
    users_histories: Mapping[str, Sequence[str]],
    *,
    z: float = DISTINCT_Z,
    ngram: tuple[int, int] = (1, 2),
    min_count: int = 2,
    prior_strength: float = DISTINCT_PRIOR_STRENGTH,
) -> dict[str, dict[str, float]]:
    """Per user: ``term -> z`` for the terms distinctive of their history against the other
    users' histories: ``z`` above the threshold and used at least ``min_count`` times by the
    user (:func:`log_odds_z`; a term used once is not a habit).

    Pass history texts only: the terms must be fixed before anything is fitted or evaluated.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    result: dict[str, dict[str, float]] = {user: {} for user in users_histories}
    for terms, counts, scores in _scores(users_histories, ngram, prior_strength):
        for row, user in enumerate(users_histories):
            keep = np.flatnonzero((scores[row] > z) & (counts[row] >= min_count))
            result[user].update((terms[k], float(scores[row, k])) for k in keep)
    return result


def distinct_char_spans(text: str, terms: Collection[str]) -> list[tuple[int, int]]:
    """The ``[start, end)`` character spans of ``text`` covered by ``terms`` (a user's
    :func:`distinctive_terms`): every occurrence of a term as consecutive :func:`tokenize`
    tokens, a bigram covering both tokens and the space between. Sorted, overlapping or touching
    spans merged. ``text`` is only read: it never changes the terms."""
    tokens = tokenize(text)
    words = [t.text for t in tokens]
    spans = sorted(
        (tokens[k].start, tokens[k + n - 1].end)
        for n in sorted({term.count(" ") + 1 for term in terms})
        for k, gram in enumerate(_ngrams(words, n))
        if gram in terms
    )
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def token_mask_from_spans(
    offsets: Sequence[tuple[int, int]] | np.ndarray, spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """A bool mask over tokens: ``True`` where a token's ``[start, end)`` characters (a
    tokenizer's ``offset_mapping`` for the same text) overlap a span. Empty tokens (special
    tokens, ``(0, 0)``) are never in the mask."""
    tok = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    overlap = (tok[:, None, 0] < sp[None, :, 1]) & (sp[None, :, 0] < tok[:, None, 1])
    return overlap.any(axis=1) & (tok[:, 1] > tok[:, 0])


def heldout_distinct_spans(
    users: Sequence[UserHistory],
    *,
    z: float = DISTINCT_Z,
    ngram: tuple[int, int] = (1, 2),
    min_count: int = 2,
    prior_strength: float = DISTINCT_PRIOR_STRENGTH,
) -> dict[str, list[list[tuple[int, int]]]]:
    """Per user, per held-out item: the character spans of the item's ``output`` covered by the
    terms distinctive of the user's history outputs against the other users' history outputs
    (the ``nll_distinct`` mask before tokenization). Held-out texts never enter the terms."""
    ids = [user.user_id for user in users]
    if len(set(ids)) < len(ids):
        raise ValueError(f"duplicate user ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    terms = distinctive_terms(
        {user.user_id: [item.output for item in user.history] for user in users},
        z=z,
        ngram=ngram,
        min_count=min_count,
        prior_strength=prior_strength,
    )
    return {
        user.user_id: [
            distinct_char_spans(item.output, terms[user.user_id]) for item in user.heldout
        ]
        for user in users
    }
