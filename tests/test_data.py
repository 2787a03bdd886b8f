"""Tests of steerx_lens.data: schema and JSONL I/O, the source registry, the sources."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from steerx_lens import data
from steerx_lens.data import (
    SOURCES,
    HistoryItem,
    UserHistory,
    load_users,
    make_synthetic_users,
    read_users,
    register_source,
    save_users,
)
from steerx_lens.data.sources import health_tweets, stackexchange
from steerx_lens.data.splits import time_window


def _user() -> UserHistory:
    return UserHistory(
        user_id="u1",
        history=[
            HistoryItem("q1", "Hello, wörld 🍀\nline two"),
            HistoryItem("q2", "a2", meta={"spans": [{"start": 0, "end": 2, "marker": "a2"}]}),
            HistoryItem("q3", "a3"),
        ],
        heldout=[HistoryItem("q4", "a4")],
        meta={"source": "test"},
    )


def test_jsonl_round_trip_and_schema(tmp_path: Path) -> None:
    users = [_user(), UserHistory("u2", [HistoryItem("x", "y")])]
    path = save_users(users, tmp_path / "sub" / "users.jsonl")
    assert read_users(path) == users
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"user_id", "history", "heldout", "meta"}
    assert first["history"][0] == {"input": "q1", "output": "Hello, wörld 🍀\nline two"}
    assert first["history"][1]["meta"]["spans"][0]["marker"] == "a2"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    save_users(users[:1], path)  # replaces the existing file
    assert read_users(path) == users[:1]
    assert load_users(path) == users[:1]  # detected as the steerx schema


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"user_id": 3, "history": []}', "user_id"),
        ('{"user_id": "b", "history": [{"input": "q"}]}', "output"),
        ('{"user_id": "b"}', "history"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_user().to_dict())
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        read_users(path)


def test_duplicate_user_id_is_rejected(tmp_path: Path) -> None:
    path = save_users([_user(), _user()], tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate user_id 'u1'"):
        read_users(path)


def test_split_validation_keeps_heldout() -> None:
    user = _user()
    train, validation = user.split_validation(1)
    assert [i.input for i in train] == ["q1", "q2"]
    assert [i.input for i in validation] == ["q3"]
    assert [i.input for i in user.heldout] == ["q4"]
    with pytest.raises(ValueError, match="cannot hold out 3"):
        user.split_validation(3)


def test_synthetic_is_deterministic_and_seed_dependent() -> None:
    assert make_synthetic_users(seed=0) == make_synthetic_users(seed=0)
    assert load_users("synthetic", n_users=6) == make_synthetic_users(seed=0)
    assert make_synthetic_users(seed=0) != make_synthetic_users(seed=1)


def test_synthetic_markers_at_recorded_spans() -> None:
    users = make_synthetic_users(n_users=8, n_history=6, n_heldout=2, seed=3)
    all_markers = [m for u in users for m in u.meta["markers"]]
    assert len(all_markers) == len(set(all_markers))  # no marker shared by two users
    for user in users:
        markers = user.meta["markers"]
        assert 2 <= len(markers) <= 3
        assert len(user.history) == 6 and len(user.heldout) == 2
        for item in user.history + user.heldout:
            assert len(item.output.split()) < 60
            spans = item.meta["spans"]
            assert sorted(s["marker"] for s in spans) == sorted(markers)  # marker_prob=1
            for span in spans:
                assert item.output[span["start"] : span["end"]] == span["marker"]
            for other in all_markers:  # markers occur only where planted
                assert item.output.count(other) == (other in markers)


def test_synthetic_marker_prob_and_limits() -> None:
    users = make_synthetic_users(n_users=4, n_history=20, n_heldout=0, seed=1, marker_prob=0.5)
    counts = [len(item.meta["spans"]) for u in users for item in u.history]
    assert 0 < sum(counts) < sum(len(u.meta["markers"]) for u in users) * 20
    with pytest.raises(ValueError, match="n_users"):
        make_synthetic_users(n_users=data.MAX_SYNTHETIC_USERS + 1)


def test_stackexchange_beer_file() -> None:
    path = data.shared_data_dir() / stackexchange.STACKEXCHANGE_BEER_FILE
    if not path.exists():
        pytest.skip(f"shared Stack Exchange file not found at {path}")
    users = load_users("stackexchange_beer", n_users=3)
    assert len(users) == 3
    raw = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    first = users[0]
    assert first.user_id == raw["user_id"]
    assert len(first.history) == len(raw["history"]) and len(first.heldout) == len(raw["heldout"])
    item, raw_item = first.history[0], raw["history"][0]
    assert item.output == raw_item["answer"]
    assert item.input.startswith(raw_item["question_title"] + "\n\n")
    assert item.meta["id"] == raw_item["id"]
    assert first.meta["license"] == "CC BY-SA 3.0"
    longest = max(len(i.input) - len(r["question_title"]) for i, r in _pairs(users, path))
    assert longest <= stackexchange.SE_BODY_CHARS + 3  # "\n\n" + body (cut) + "…"
    assert load_users(path, n_users=1)[0].history == first.history  # format detected by path


def _pairs(users: list[UserHistory], path: Path) -> list[tuple[HistoryItem, dict[str, Any]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        (item, raw)
        for user, line in zip(users, lines, strict=False)
        for item, raw in zip(user.history, json.loads(line)["history"], strict=True)
    ]


def test_stackexchange_missing_file_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEERX_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="STEERX_SHARED_DATA"):
        load_users("stackexchange_beer")


def test_lamp_adapter(tmp_path: Path) -> None:
    records = [
        {
            "id": "110",
            "input": "Generate a title for: deep nets",
            "output": "Deep Nets Work",
            "profile": [
                {"id": "p1", "title": "On Cats", "abstract": "We study cats.", "date": "2001"},
                {"id": "p2", "text": "Plain text only."},
                {"id": "p3", "score": "5"},  # no text field: skipped
            ],
        },
        {"id": "111", "input": "Review this", "profile": [{"reviewText": "Great!"}]},
    ]
    path = tmp_path / "lamp.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({"golds": [{"id": "111", "output": "Five stars"}]}))
    users = load_users(path, gold_path=gold)
    assert [u.user_id for u in users] == ["110", "111"]
    first = users[0]
    assert [(i.input, i.output) for i in first.history] == [
        ("On Cats", "We study cats."),
        ("", "Plain text only."),
    ]
    assert first.history[0].meta == {"id": "p1", "date": "2001"}
    assert first.heldout[0].input == "Generate a title for: deep nets"
    assert first.heldout[0].output == "Deep Nets Work"
    assert users[1].heldout[0].output == "Five stars"
    assert users[1].history[0].output == "Great!"
    with pytest.raises(ValueError, match="record 1: no output"):
        load_users(path)


def test_health_tweets_two_accounts() -> None:
    users = load_users("health_tweets", n_users=2, n_history=5, n_heldout=2)
    assert [u.user_id for u in users] == list(data.HEALTH_ACCOUNTS[:2])
    url = re.compile(r"https?:|://|www\.|\b\w+\.(?:ly|ms|co|in|to|it|me)/|htt…")
    for user in users:
        assert len(user.history) == 5 and len(user.heldout) == 2
        items = user.history + user.heldout
        ids = [i.meta["tweet_id"] for i in items]
        assert ids == sorted(ids) and len(set(i.output for i in items)) == len(items)
        for item in items:
            assert not url.search(item.output), item.output
            assert len(item.input.split()) == health_tweets.HEALTH_PROMPT_WORDS
            assert "#" not in item.input and "@" not in item.input
    everything = health_tweets._health_tweets()
    assert len(everything) == 16
    for tweets in everything.values():
        texts = [t for _, t in tweets]
        assert all(texts) and len(set(texts)) == len(texts)
        assert not any(url.search(t) for t in texts)


def test_time_window_counts_back_from_the_newest() -> None:
    items = list(range(10))
    assert time_window(items, 4) == [6, 7, 8, 9]
    assert time_window(items, 4, window=1) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="window 2 needs 12 items, only 10"):
        time_window(items, 4, window=2)
    with pytest.raises(ValueError, match="window >= 0"):
        time_window(items, 4, window=-1)


def test_health_tweets_windows_are_older_and_disjoint() -> None:
    newest, older = (
        load_users("health_tweets", n_users=2, n_history=5, n_heldout=2, window=w) for w in (0, 1)
    )
    for new, old in zip(newest, older, strict=True):
        assert (new.meta["window"], old.meta["window"]) == (0, 1)
        new_ids = [i.meta["tweet_id"] for i in new.history + new.heldout]
        old_ids = [i.meta["tweet_id"] for i in old.history + old.heldout]
        assert max(old_ids) < min(new_ids)  # every item of window 1 is older than window 0's
        usable = [n for n, t in health_tweets._health_tweets()[new.user_id] if len(t.split()) > 4]
        assert usable[-14:] == old_ids + new_ids  # contiguous: nothing between the windows
    with pytest.raises(ValueError, match="account 'bbchealth': window 500 needs"):
        load_users("health_tweets", n_users=1, window=500)


def test_clean_tweet() -> None:
    text = "RT @x: Q&amp;A on flu http://t.co/abc and on.fb.me/tq9 http:/…"
    assert health_tweets.clean_tweet(text) == "RT @x: Q&A on flu and"


def test_unknown_source() -> None:
    with pytest.raises(FileNotFoundError, match="not a built-in source"):
        load_users("no_such_dataset")


def test_registered_source_is_loaded_by_name() -> None:
    def two_users(n_users: int | None = None, seed: int = 0) -> list[UserHistory]:
        return make_synthetic_users(n_users=2, seed=seed)[:n_users]

    register_source("two_synthetic", two_users)
    try:
        assert load_users("two_synthetic", seed=1) == make_synthetic_users(n_users=2, seed=1)
        assert [u.user_id for u in load_users("two_synthetic", n_users=1)] == ["synthetic-00"]
    finally:
        del SOURCES["two_synthetic"]
