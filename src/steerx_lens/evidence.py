"""Per-user evidence: what SteerX learns about a user before a layer is chosen.

For each user the pipeline computes, once:

- the attribution (stages 1-2: causal token effects and ranked spans) and its description
  (stage 3), from other users' histories as counterfactual contexts;
- the model's own answers ŷ to the user's prompts (the baseline's rejected side);
- the minimal pairs: each history text with a preference-driven token and its twin, in which
  the tokens with patch-CE above ``swap_threshold`` are replaced by the model's top-1
  prediction under another user's context (same token count), see :func:`minimal_pairs`.

None of it depends on the site where vectors are built, so a :class:`UserEvidence` is reused at
every layer (:meth:`steerx_lens.pipeline.SteerX.vectors`) and can be saved and loaded
(:meth:`UserEvidence.save`, one safetensors file per user: the effect tensors, and the rest as
JSON in the header).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from steerx_lens.atomic import write_bytes
from steerx_lens.attribution import Span, TokenEffects, UserAttribution
from steerx_lens.backbones import Sample
from steerx_lens.data import HistoryItem, UserHistory
from steerx_lens.errors import SteerXError
from steerx_lens.text import EncodedText, encode_item

EVIDENCE_FORMAT = 1
"""Version of the evidence file layout; files of a newer version are refused."""
METADATA_KEY = "steerx_evidence"


@dataclass(frozen=True)
class MinimalPairs:
    """A user's texts that have preference-driven tokens (``originals``) and their ``twins``.

    Both sides pin their tokens (:attr:`Sample.tokens`): a twin is its original's token ids with
    ``n_swapped_tokens`` (over all pairs) replaced, and its text is the decoded twin.
    """

    originals: list[Sample]
    twins: list[Sample]
    n_swapped_tokens: int


def minimal_pairs(
    tokenizer: Any,
    user: UserHistory,
    effects: Sequence[TokenEffects],
    swap_threshold: float,
    randomize: random.Random | None = None,
) -> MinimalPairs:
    """Each item's text and its swapped twin (tokens with effect > ``swap_threshold`` swapped).

    With ``randomize`` (the ``random_swap`` control) each item swaps the same number of tokens
    at positions drawn at random among those whose counterfactual prediction differs, so only
    the causal selection separates it from SteerX's pairs.

    Items whose response tokens differ between the attribution and the plain prompt are skipped
    with a warning; items with no token to swap give no pair.
    """
    originals, twins, n_swapped = [], [], 0
    for item_effects in effects:
        item = user.history[item_effects.item_index]
        original = encode_item(tokenizer, item)
        response = original.input_ids[original.response_start :]
        if item_effects.counterfactual_top is None or response != item_effects.token_ids.tolist():
            warnings.warn(
                f"user {user.user_id!r} item {item_effects.item_index}: response tokens differ "
                "between the attribution and the plain prompt; item skipped",
                stacklevel=2,
            )
            continue
        changeable = item_effects.counterfactual_top != item_effects.token_ids
        swap = (item_effects.effects > swap_threshold) & changeable
        if not bool(swap.any()):
            continue
        if randomize is not None:
            candidates = torch.nonzero(changeable).flatten().tolist()
            chosen = randomize.sample(candidates, int(swap.sum()))
            swap = torch.zeros_like(swap)
            swap[chosen] = True
        swapped = torch.where(swap, item_effects.counterfactual_top, item_effects.token_ids)
        n_swapped += int(swap.sum())
        twin_text = tokenizer.decode(swapped.tolist())
        originals.append(Sample(item, original))
        twins.append(
            Sample(HistoryItem(item.input, twin_text), original.with_response(swapped.tolist()))
        )
    return MinimalPairs(originals, twins, n_swapped)


@dataclass
class UserEvidence:
    """Everything about one user that does not depend on the layer (see the module docstring).

    ``negatives`` are the rejected side of the baseline, one per history item: the model's
    answers ŷ (or a neutral text, ``SteerXConfig(negatives="neutral")``).
    """

    user: UserHistory
    attribution: UserAttribution
    negatives: list[HistoryItem]
    pairs: MinimalPairs

    @property
    def user_id(self) -> str:
        """The user's id."""
        return self.user.user_id

    @property
    def description(self) -> str | None:
        """The user's natural-language preference description (stage 3)."""
        return self.attribution.description

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file atomically: effect tensors, the rest as JSON metadata."""
        tensors: dict[str, Tensor] = {}
        items = []
        for index, item in enumerate(self.attribution.items):
            plain = {}
            for field in fields(item):
                value = getattr(item, field.name)
                if isinstance(value, Tensor):
                    tensors[f"items.{index}.{field.name}"] = value.detach().cpu().contiguous()
                else:
                    plain[field.name] = value
            items.append(plain)
        metadata = {
            "format": EVIDENCE_FORMAT,
            "user": self.user.to_dict(),
            "attribution": {
                "user_id": self.attribution.user_id,
                "items": items,
                "spans": [asdict(span) for span in self.attribution.spans],
                "description": self.attribution.description,
            },
            "negatives": [item.to_dict() for item in self.negatives],
            "pairs": {
                "originals": [_sample_to_dict(s) for s in self.pairs.originals],
                "twins": [_sample_to_dict(s) for s in self.pairs.twins],
                "n_swapped_tokens": self.pairs.n_swapped_tokens,
            },
        }
        return write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(metadata)}))

    @classmethod
    def load(cls, path: str | Path) -> UserEvidence:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise SteerXError(f"no evidence file at {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            meta = json.loads(header[METADATA_KEY])
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            raise SteerXError(f"{path} is not a readable evidence file: {error}") from error
        if not isinstance(meta.get("format"), int) or meta["format"] > EVIDENCE_FORMAT:
            raise SteerXError(
                f"{path} has evidence format {meta.get('format')}; this steerx_lens reads up to "
                f"{EVIDENCE_FORMAT}: upgrade steerx_lens"
            )
        attribution = meta["attribution"]
        items = [
            TokenEffects(
                **plain,
                **{
                    key.removeprefix(f"items.{index}."): value
                    for key, value in tensors.items()
                    if key.startswith(f"items.{index}.")
                },
            )
            for index, plain in enumerate(attribution["items"])
        ]
        pairs = meta["pairs"]
        return cls(
            UserHistory.from_dict(meta["user"]),
            UserAttribution(
                attribution["user_id"],
                items,
                [Span(**span) for span in attribution["spans"]],
                attribution["description"],
            ),
            [HistoryItem.from_dict(item) for item in meta["negatives"]],
            MinimalPairs(
                [_sample_from_dict(s) for s in pairs["originals"]],
                [_sample_from_dict(s) for s in pairs["twins"]],
                pairs["n_swapped_tokens"],
            ),
        )


def _sample_to_dict(sample: Sample) -> dict[str, Any]:
    tokens = None if sample.tokens is None else asdict(sample.tokens)
    return {"item": sample.item.to_dict(), "tokens": tokens}


def _sample_from_dict(data: dict[str, Any]) -> Sample:
    tokens = None if data["tokens"] is None else EncodedText(**data["tokens"])
    return Sample(HistoryItem.from_dict(data["item"]), tokens)
