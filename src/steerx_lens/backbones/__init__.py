"""Backbones: how a steering vector is computed from paired chosen / rejected texts.

A backbone is a plain callable (the :class:`Backbone` protocol)::

    vector(model, site, chosen, rejected, **options) -> Float[Tensor, "d_model"]

where ``chosen`` / ``rejected`` are paired :class:`Sample` s (the text and its tokens), or
plain strings, ``(prompt, response)`` tuples, history items or token ids (:data:`SampleLike`,
normalised by :func:`as_samples` / :func:`as_encoded`), and
``options`` the pipeline's backbone options (each backbone ignores those it does not use).
:class:`~steerx_lens.pipeline.SteerX` looks ``SteerXConfig.backbone`` up in :data:`BACKBONES`:

- ``"mean_diff"``: mean difference of pooled activations (:mod:`.mean_diff`);
- ``"bipo"``: a BiPO vector trained on the pairs (:mod:`.bipo`);
- ``"sae"``: the mean difference of the texts projected onto SAE decoder rows (:mod:`.sae`).
  The projection is a step on any backbone: ``register_backbone("bipo_sae",
  sae_projection(bipo_backbone))``.

Adding a backbone: write the function, then ``register_backbone("name", function)``.
"""

from __future__ import annotations

from steerx_lens.backbones.base import Backbone, Sample, SampleLike
from steerx_lens.backbones.bipo import bipo_backbone
from steerx_lens.backbones.inputs import as_encoded, as_sample, as_samples, encode_text
from steerx_lens.backbones.mean_diff import mean_diff_backbone, shared_reads
from steerx_lens.backbones.sae import sae_backbone, sae_projection

BACKBONES: dict[str, Backbone] = {
    "mean_diff": mean_diff_backbone,
    "bipo": bipo_backbone,
    "sae": sae_backbone,
}
"""The backbones :class:`~steerx_lens.pipeline.SteerX` can use, by ``SteerXConfig.backbone``."""


def register_backbone(name: str, backbone: Backbone) -> Backbone:
    """Make ``backbone`` available as ``SteerXConfig(backbone=name)``; returns it."""
    BACKBONES[name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    """The backbone registered as ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


__all__ = [
    "shared_reads",
    "BACKBONES",
    "Backbone",
    "Sample",
    "SampleLike",
    "as_encoded",
    "as_sample",
    "as_samples",
    "encode_text",
    "get_backbone",
    "register_backbone",
    "sae_projection",
]
