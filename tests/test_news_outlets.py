"""The built-in ``news_outlets`` source: 9 outlets, time-ordered splits fixed per item, cleaning."""

from __future__ import annotations

import pytest

from steerx_lens.data import SOURCES, UserHistory, load_users
from steerx_lens.data.sources import news_outlets
from steerx_lens.data.sources.news_outlets import (
    NEWS_OPENING_CHARS,
    NEWS_OUTLETS,
    article_opening,
    clean_article_text,
    load_news_outlets,
)


def _key(item_meta: dict) -> tuple[str, int]:
    return item_meta["date"], item_meta["article_id"]


@pytest.fixture(scope="module")
def outlets() -> list[UserHistory]:
    return load_users("news_outlets")


def test_registered() -> None:
    assert SOURCES["news_outlets"] is load_news_outlets


def test_nine_outlets_with_default_splits(outlets: list[UserHistory]) -> None:
    assert [u.user_id for u in outlets] == list(NEWS_OUTLETS) and len(outlets) == 9
    for user in outlets:
        assert (len(user.history), len(user.heldout)) == (12, 4)
        assert user.meta["outlet"] == user.user_id
        for item in user.history + user.heldout:
            assert item.input and 0 < len(item.output) <= NEWS_OPENING_CHARS
            assert item.output == " ".join(item.output.split())


def test_heldout_is_newer_than_history_and_meta_records_it(outlets: list[UserHistory]) -> None:
    for user in outlets:
        keys = [_key(item.meta) for item in user.history + user.heldout]
        assert keys == sorted(keys)
        assert max(_key(i.meta) for i in user.history) < min(_key(i.meta) for i in user.heldout)
        assert max(i.meta["date"] for i in user.history) <= min(
            i.meta["date"] for i in user.heldout
        )
        assert user.meta["date_range"] == [keys[0][0], keys[-1][0]]
        assert user.meta["article_ids"] == {
            "history": [i.meta["article_id"] for i in user.history],
            "heldout": [i.meta["article_id"] for i in user.heldout],
        }


def test_held_out_items_are_the_newest_usable_articles() -> None:
    everything = news_outlets._news_articles()
    for user in load_news_outlets(n_users=2, n_history=3, n_heldout=2):
        items = news_outlets._items(everything[user.user_id], NEWS_OPENING_CHARS)
        assert [i.meta for i in user.heldout] == [i.meta for i in items[-2:]]


def test_no_article_appears_twice(outlets: list[UserHistory]) -> None:
    ids = [i.meta["article_id"] for u in outlets for i in u.history + u.heldout]
    assert len(ids) == len(set(ids))
    for user in outlets:
        items = user.history + user.heldout
        assert len({i.input for i in items}) == len({i.output for i in items}) == len(items)


def test_split_is_fixed_per_item_and_deterministic(outlets: list[UserHistory]) -> None:
    again = load_news_outlets()
    assert [u.to_dict() for u in again] == [u.to_dict() for u in outlets]
    longer = load_news_outlets(n_history=30)
    for short, long in zip(outlets, longer, strict=True):
        assert [i.to_dict() for i in long.heldout] == [i.to_dict() for i in short.heldout]
        assert [i.to_dict() for i in long.history[-12:]] == [i.to_dict() for i in short.history]


def test_earlier_windows_replicate_the_split_on_older_articles(
    outlets: list[UserHistory],
) -> None:
    older = load_news_outlets(window=1)
    for new, old in zip(outlets, older, strict=True):
        assert (new.meta["window"], old.meta["window"]) == (0, 1)
        assert (len(old.history), len(old.heldout)) == (len(new.history), len(new.heldout))
        old_keys = [_key(i.meta) for i in old.history + old.heldout]
        new_keys = [_key(i.meta) for i in new.history + new.heldout]
        assert max(old_keys) < min(new_keys)  # window 1 is older than window 0, no overlap
    with pytest.raises(
        ValueError, match="outlet 'cnn': window 100 needs 1616 items, only 274 usable articles"
    ):
        load_news_outlets(outlets=["cnn"], window=100)


def test_n_users_and_outlets_choose_users() -> None:
    assert [u.user_id for u in load_users("news_outlets", n_users=3)] == list(NEWS_OUTLETS)[:3]
    chosen = load_news_outlets(outlets=["cnn", "bbc"], n_history=2, n_heldout=1)
    assert [u.user_id for u in chosen] == ["cnn", "bbc"]
    with pytest.raises(ValueError, match="unknown news outlet 'fox'"):
        load_news_outlets(outlets=["fox"])
    with pytest.raises(ValueError, match="usable articles"):
        load_news_outlets(outlets=["cnn"], n_history=10_000)


def test_cleaning_removes_urls_and_repairs_encoding_losses() -> None:
    raw = (
        'He said "?it\'s over."?Then he left.- See https://t.co/Ab1 and www.dw.com, '
        "visit-www.example.org. or on.fb.me/x pic.twitter.com/Zz9 (mail renqi@chinadaily.com.cn) "
        'We wouldn"t go to the D\ufffd\ufffdil in J?ger\u200b   now.'
    )
    assert clean_article_text(raw) == (
        "He said - it's over.\" Then he left. See and or (mail We wouldn't go to the Dil in "
        "Jger now."
    )


def test_cleaned_outputs_hold_no_urls(outlets: list[UserHistory]) -> None:
    for user in outlets:
        for item in user.history + user.heldout:
            for text in (item.input, item.output):
                assert not any(s in text for s in ("://", "www.", ".com/", "\ufffd", '"?')), text


def test_opening_takes_whole_sentences_within_the_budget() -> None:
    text = "The U.S. Sen. Smith met No. 2 officials. They spoke for an hour. A third one follows."
    assert (
        article_opening(text, 70)
        == "The U.S. Sen. Smith met No. 2 officials. They spoke for an hour."
    )
    assert article_opening(text, 1000) == text
    dateline = "MOSCOW, March 29. /TASS/. " + "A long sentence goes on and on " * 5 + "until here."
    # a lone dateline fills less than half the budget: cut at the last space instead
    assert (
        article_opening(dateline, 60)
        == "MOSCOW, March 29. /TASS/. A long sentence goes on and on A"
    )
    with pytest.raises(ValueError, match="max_chars"):
        article_opening(text, 0)
