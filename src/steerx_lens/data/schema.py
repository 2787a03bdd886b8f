"""The data model: a user (:class:`UserHistory`) is a list of items (:class:`HistoryItem`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
