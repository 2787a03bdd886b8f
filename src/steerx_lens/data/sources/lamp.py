"""LaMP / LongLaMP benchmark files: one user per record, the record itself held out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerx_lens.data.io import parse_json, read_text
from steerx_lens.data.schema import HistoryItem, UserHistory
from steerx_lens.errors import DataError

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
    data = parse_json(read_text(path), str(path))
    golds = data.get("golds") if isinstance(data, dict) else data
    if not isinstance(golds, list) or not all(isinstance(g, dict) and "id" in g for g in golds):
        raise DataError(f"{path}: expected a list of {{'id', 'output'}} under 'golds'")
    return {str(g["id"]): g.get("output") for g in golds}


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
    records = parse_json(read_text(path), str(path))
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of LaMP records")
    golds = _read_lamp_golds(Path(gold_path)) if gold_path is not None else {}
    users = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or not isinstance(record.get("input"), str):
            raise DataError(f"{where}: a LaMP record needs a string 'input' and a 'profile'")
        if not isinstance(record.get("profile"), list) or not all(
            isinstance(entry, dict) for entry in record["profile"]
        ):
            raise DataError(f"{where}: 'profile' must be a list of objects")
        record_id = str(record.get("id", index))
        output = record.get("output", golds.get(record_id))
        if not isinstance(output, str):
            raise DataError(f"{where}: no output inline or in the gold file for id {record_id!r}")
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
