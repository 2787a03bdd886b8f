"""TransformerLens's ``TransformerBridge`` (TL 3.x and 4.x): TL hook names over an HF model.

The bridge runs the wrapped HF model, so the step context is tracked on the HF model and
generation is HF ``generate`` with the KV cache (see the ``"bridge_kv_cache"`` patch in
:mod:`steerx_lens.backends.patches`). TransformerLens 4.x keeps only the bridge, so this is the
TransformerLens backend that works with both major versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerx_lens.backends import patches
from steerx_lens.backends.base import Batch, Decoding, ModelAdapter
from steerx_lens.backends.hf import hf_generate, install_tracker, position_ids_for
from steerx_lens.backends.transformer_lens import _TLAdapterBase
from steerx_lens.core import Intervention
from steerx_lens.errors import BackendError

STACK = "transformer_lens"
SUPPORTS_DEVICE_MAP = False


def matches(model: Any) -> bool:
    """Whether ``model`` is a ``TransformerBridge``."""
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def make_adapter(model: Any, tokenizer: Any) -> ModelAdapter:
    """The adapter of a ``TransformerBridge``."""
    return BridgeAdapter(model, tokenizer)


def load(
    folder: Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: Any = None,
) -> Any:
    """A local HF folder booted as a ``TransformerBridge`` (its own tokenizer prepends BOS;
    the adapter keeps the plain one so that every backend sees the same token ids)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype).eval()


class BridgeAdapter(_TLAdapterBase):
    """Adapter for ``transformer_lens.model_bridge.TransformerBridge``.

    The bridge runs the wrapped HF model, so the step context is tracked on the HF model and
    generation is HF ``generate`` with the KV cache (after
    :func:`~steerx_lens.backends.patches.fix_bridge_kv_cache`).
    """

    name = "bridge"
    # The bridge's hook_resid_mid aliases the second layer norm's input: editing it does not
    # reach the residual stream, so it is emulated through resid_pre + attn_out.
    emulate_resid_mid = True

    def __init__(self, model: Any, tokenizer: Any) -> None:
        if patches.is_enabled("bridge_kv_cache"):
            patches.fix_bridge_kv_cache()
        super().__init__(model, tokenizer)

    def embedding_weight(self) -> Float[Tensor, "vocab d_model"]:
        return self.model.original_model.get_input_embeddings().weight

    def _install_tracker(self) -> Any:
        return install_tracker(self.model.original_model, self.tracker)

    def forward(
        self, batch: Batch, interventions: Sequence[Intervention], grad: bool = False
    ) -> Float[Tensor, "batch pos vocab"]:
        with self.apply(interventions), torch.set_grad_enabled(grad):
            return self.model(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids_for(batch.attention_mask),
                use_cache=False,
            )

    supports_sampling = True

    def generate(
        self,
        batch: Batch,
        interventions: Sequence[Intervention],
        max_new_tokens: int,
        decoding: Decoding | None = None,
    ) -> Int[Tensor, "batch total"]:
        """HF ``generate`` on the bridged model, KV-cached (needs the ``"bridge_kv_cache"``
        patch: without it every cached step attends to itself alone); greedy unless
        ``decoding`` samples."""
        if not patches.is_enabled("bridge_kv_cache"):
            raise BackendError(
                "bridge generation needs the 'bridge_kv_cache' compatibility patch (disabled): "
                "enable it with steerx_lens.backends.patches.enable('bridge_kv_cache') or "
                "generate on the hf backend"
            )
        patches.fix_bridge_kv_cache()
        return hf_generate(
            self, self.model.original_model, batch, interventions, max_new_tokens, decoding
        )
