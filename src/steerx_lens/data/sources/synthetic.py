"""Synthetic users with planted preference markers (adjective, emoji, sign-off, hashtag)."""

from __future__ import annotations

import random
from typing import Any

from steerx_lens.data.schema import HistoryItem, UserHistory

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


def load_synthetic(n_users: int | None = None, **options: Any) -> list[UserHistory]:
    """The ``"synthetic"`` source: :func:`make_synthetic_users` with ``n_users`` (default 6)."""
    return make_synthetic_users(n_users=n_users or 6, **options)
