"""SAE features (optional): steering vectors expressed in, or built from, SAELens SAE features.

Uses of a sparse autoencoder (SAELens) at one residual site:

- :func:`project_vector` rewrites a steering vector as a sparse combination of at most ``k`` SAE
  decoder directions (chosen by how much of the vector they explain, or by given per-feature
  scores such as causal attributions) and decodes it back: a denoised, interpretable vector.
  :func:`sae_projection` makes it a step after any backbone; the ``"sae"`` backbone
  (:func:`sae_backbone`) is the mean difference followed by that step.
- :func:`feature_steering_vector` steers directly with chosen features (sum of weighted unit
  decoder rows), ready for :class:`steerx_lens.hooks.Steer`.
- :func:`feature_activations` / :func:`top_features` show which features fire on a user's
  preference tokens.

:func:`load_sae` loads any SAE saved by SAELens; :mod:`steerx_lens.backbones.sae_training`
trains a small one offline. ``SAE.from_pretrained`` is never called: it needs the hub.

This backbone is a reconstruction: the SteerX paper's body was not available, so how its SAE
variant picks features is not known; the choices here are documented options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from steerx_lens import hooks
from steerx_lens.backbones.base import Backbone, Sample, SampleLike
from steerx_lens.backbones.inputs import as_encoded, as_samples
from steerx_lens.backbones.mean_diff import mean_diff_backbone, pooled_activations
from steerx_lens.backends import get_adapter
from steerx_lens.core import Batch, Inputs
from steerx_lens.errors import (
    ModelMismatchError,
    NonFiniteError,
    SteerXError,
    VectorShapeError,
)
from steerx_lens.extras import require

if TYPE_CHECKING:
    from sae_lens import SAE

SelectBy = Literal["magnitude", "attribution"]

FINGERPRINT_KEY = "steerx_model_fingerprint"
"""SAE metadata key holding the fingerprint of the model a trained SAE reads (checked on use)."""


class SAELoadError(SteerXError, ValueError):
    """A folder that should hold an SAELens SAE but is incomplete or corrupt."""


@dataclass(frozen=True)
class SAEProjection:
    """A vector rewritten in SAE decoder directions.

    ``vector = coefficients @ sae.W_dec[features]`` (the reconstruction, ``[d_model]``);
    ``coefficients`` are in SAE feature-activation units (raw decoder rows); ``features`` come
    largest share first (``|coefficient| * ||W_dec[feature]||``) for ``by="magnitude"``, highest
    score first for ``by="attribution"``. ``explained`` is the cosine between the original
    vector and the reconstruction.
    """

    vector: Float[Tensor, " d_model"]
    features: Int[Tensor, " k"]
    coefficients: Float[Tensor, " k"]
    explained: float


# --------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE saved by SAELens (``save_model`` / ``save_inference_model``) from a folder.

    Raises ``FileNotFoundError`` when the folder does not exist and :class:`SAELoadError` when
    its ``cfg.json`` / ``sae_weights.safetensors`` are missing or unreadable. The weights are
    copied into memory, so the SAE stays valid when the folder is later rewritten or deleted.
    """
    require("sae_lens", "loading an SAE")
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no SAE folder at {folder}: expected a folder written by SAELens with "
            f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
        )
    missing = [
        name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (folder / name).is_file()
    ]
    if missing:
        raise SAELoadError(
            f"{folder} is not a complete SAELens SAE folder: missing {', '.join(missing)}"
        )
    try:
        sae = SAE.load_from_disk(folder, device=device)
    except Exception as exc:  # SAELens raises many types on bad json, weights or architecture
        raise SAELoadError(
            f"could not load the SAE in {folder} ({type(exc).__name__}: {exc}); the folder looks "
            "corrupt: re-save it with SAELens, or delete it (train_demo_sae re-trains cached SAEs)"
        ) from exc
    with torch.no_grad():  # CPU weights are memory-mapped: rewriting the file would crash them
        for tensor in [*sae.parameters(), *sae.buffers()]:
            tensor.data = tensor.data.clone()
    return sae


def check_sae_fits(sae: SAE, model: Any, site: str | None = None) -> None:
    """Check that ``sae`` reads the activations of ``model`` at ``site``.

    Raises :class:`VectorShapeError` when the SAE's ``d_in`` differs from the model's
    ``d_model``, :class:`ModelMismatchError` when the SAE was trained at another hook than
    ``site`` or (for SAEs from :func:`~steerx_lens.backbones.sae_training.train_demo_sae`) on another model, and
    :class:`~steerx_lens.errors.UnknownSiteError` when the model has no such site.
    """
    adapter = get_adapter(model)
    if sae.cfg.d_in != adapter.d_model:
        raise VectorShapeError(
            f"the SAE reads {sae.cfg.d_in}-dimensional activations but the model's d_model is "
            f"{adapter.d_model}: it was trained on another model"
        )
    metadata = getattr(sae.cfg, "metadata", None)
    hook_name = getattr(metadata, "hook_name", None)
    if site is not None:
        adapter.resolve(site)
        if hook_name is not None and hook_name != site:
            raise ModelMismatchError(
                f"the SAE was trained on {hook_name!r}, not on {site!r}: use it at its own site "
                "or train one for this site"
            )
    fingerprint = getattr(metadata, FINGERPRINT_KEY, None)
    if fingerprint is not None and fingerprint != adapter.fingerprint():
        raise ModelMismatchError(
            f"the SAE was trained on model {fingerprint}, this model is {adapter.fingerprint()}"
        )


def _sae_site(sae: SAE, site: str | None) -> str:
    """``site``, or the hook the SAE was trained on."""
    chosen = site or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if chosen is None:
        raise ValueError("the SAE does not record its hook name; pass site=...")
    return chosen


# --------------------------------------------------------------------------------------------
# Vectors in SAE feature space
# --------------------------------------------------------------------------------------------


def _check_vector(vector: Tensor, width: int) -> None:
    if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.shape[0] != width:
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise VectorShapeError(f"expected a [{width}] vector (the SAE's d_in), got {shape}")
    if not torch.isfinite(vector).all():
        raise NonFiniteError("the vector contains NaN or infinity")


def _least_squares(target: Float[Tensor, " d"], atoms: Float[Tensor, "m d"]) -> Float[Tensor, " m"]:
    """Coefficients c minimising ``||target - c @ atoms||`` (float64, CPU)."""
    return torch.linalg.lstsq(atoms.T, target.unsqueeze(1)).solution.squeeze(1)


def _matching_pursuit(
    target: Float[Tensor, " d"], unit_atoms: Float[Tensor, "n d"], k: int
) -> list[int]:
    """Orthogonal matching pursuit: k greedy picks by |residual . atom|, refit after each."""
    chosen: list[int] = []
    residual = target
    tolerance = 1e-9 * float(target.norm())
    for _ in range(k):
        if float(residual.norm()) <= tolerance:
            break  # already exact: more features would only add noise
        scores = (unit_atoms @ residual).abs()
        scores[chosen] = -1.0
        chosen.append(int(scores.argmax()))
        basis = unit_atoms[chosen]
        residual = target - _least_squares(target, basis) @ basis
    return chosen


def project_vector(
    vector: Float[Tensor, " d_model"],
    sae: SAE,
    *,
    k: int = 32,
    by: SelectBy = "magnitude",
    feature_scores: Float[Tensor, " d_sae"] | None = None,
) -> SAEProjection:
    """Rewrite ``vector`` as a combination of at most ``k`` SAE decoder rows and decode it back.

    Feature choice:

    - ``by="magnitude"``: orthogonal matching pursuit over the unit-normalised decoder rows —
      repeatedly add the feature most aligned with what is still unexplained, then refit. A
      one-shot top-k of ``|vector @ W_dec_normalised.T|`` picks redundant, near-duplicate
      features of an overcomplete decoder; pursuit picks the ``k`` that together explain the
      vector, and recovers a vector that truly is a sparse combination of decoder rows. Stops
      early once the vector is reconstructed exactly.
    - ``by="attribution"``: the ``k`` features with the highest ``feature_scores`` (e.g. causal
      attributions of the user's preference tokens), whatever their alignment with the vector.

    Coefficients: least squares, ``argmin_c ||vector - c @ W_dec[features]||`` on the chosen
    features (not the SAE encoder: a steering vector is a difference of activations, and the
    encoder's biases are calibrated for activations themselves, so ``encode(vector)`` is not a
    decomposition of it).
    """
    decoder = sae.W_dec.detach()
    d_sae, d_model = decoder.shape
    _check_vector(vector, d_model)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, d_sae)
    target = vector.detach().to("cpu", torch.float64)
    if float(target.norm()) == 0.0:
        raise ValueError("cannot project a zero vector")
    atoms = decoder.to("cpu", torch.float64)
    norms = atoms.norm(dim=1).clamp_min(1e-12)
    unit_atoms = atoms / norms.unsqueeze(1)
    if by == "magnitude":
        chosen = torch.tensor(_matching_pursuit(target, unit_atoms, k), dtype=torch.long)
    elif by == "attribution":
        if feature_scores is None:
            raise ValueError('by="attribution" needs feature_scores (one score per SAE feature)')
        if feature_scores.shape != (d_sae,):
            raise VectorShapeError(
                f"feature_scores must be [{d_sae}] (one per SAE feature), got "
                f"{tuple(feature_scores.shape)}"
            )
        if not torch.isfinite(feature_scores).all():
            raise NonFiniteError("feature_scores contains NaN or infinity")
        chosen = feature_scores.detach().cpu().topk(k).indices
    else:
        raise ValueError(f'by must be "magnitude" or "attribution", got {by!r}')
    unit_coefficients = _least_squares(target, unit_atoms[chosen])
    if by == "magnitude":
        order = unit_coefficients.abs().argsort(descending=True)
        chosen, unit_coefficients = chosen[order], unit_coefficients[order]
    reconstruction = unit_coefficients @ unit_atoms[chosen]
    explained = float(torch.cosine_similarity(target, reconstruction, dim=0))
    return SAEProjection(
        vector=reconstruction.to(vector.device, vector.dtype),
        features=chosen.to(vector.device),
        coefficients=(unit_coefficients / norms[chosen]).to(vector.device, vector.dtype),
        explained=explained,
    )


def feature_steering_vector(
    sae: SAE, features: Sequence[int], weights: Sequence[float] | None = None
) -> Float[Tensor, " d_model"]:
    """``sum_i weights[i] * W_dec[features[i]] / ||W_dec[features[i]]||`` (weights default 1).

    Unit rows make a weight mean "this many units along the feature's direction", whatever the
    decoder norm; scale the result with ``Steer(alpha=...)``.
    """
    decoder = sae.W_dec.detach()
    ids = [int(f) for f in features]
    if not ids:
        raise ValueError("choose at least one feature")
    bad = [f for f in ids if not 0 <= f < decoder.shape[0]]
    if bad:
        raise ValueError(
            f"features {bad} are out of range: the SAE has {decoder.shape[0]} features"
        )
    coef = (
        torch.ones(len(ids)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    )
    if coef.shape != (len(ids),):
        raise ValueError(f"got {coef.numel()} weights for {len(ids)} features")
    if not torch.isfinite(coef).all():
        raise NonFiniteError("weights contain NaN or infinity")
    rows = decoder[ids].float()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return coef.to(unit.device) @ unit


# --------------------------------------------------------------------------------------------
# Feature activations on text
# --------------------------------------------------------------------------------------------


def _site_activations(
    model: Any, inputs: Inputs, site: str, batch_size: int, skip_first: bool
) -> Iterator[tuple[Float[Tensor, "b pos d_model"], Bool[Tensor, "b pos"]]]:
    """Activations at ``site`` in chunks of a right-padded batch, with the mask of kept tokens.

    Kept = real tokens, minus each row's first token when ``skip_first`` (the attention sink,
    which SAEs from :func:`~steerx_lens.backbones.sae_training.train_demo_sae` never saw).
    """
    adapter = get_adapter(model)
    batch = adapter.encode(inputs, padding_side="right")
    for start in range(0, batch.input_ids.shape[0], batch_size):
        chunk = Batch(
            batch.input_ids[start : start + batch_size],
            batch.attention_mask[start : start + batch_size],
        )
        store = hooks.activations(model, chunk, [site])
        keep = chunk.attention_mask.bool().clone()
        if skip_first:
            first = keep.int().argmax(dim=1)
            keep[torch.arange(keep.shape[0]), first] = False
        yield store[site], keep


@torch.no_grad()
def feature_activations(
    model: Any,
    sae: SAE,
    texts: Inputs,
    site: str | None = None,
    *,
    skip_first: bool = True,
    batch_size: int = 16,
) -> Float[Tensor, "batch pos d_sae"]:
    """SAE feature activations of ``texts`` at ``site`` (default: the SAE's own hook).

    Texts are tokenized by the model's adapter (no BOS) and right-padded, so position ``t`` is
    the ``t``-th token of each text; token ids / a :class:`~steerx_lens.backends.Batch` work too.
    Padding positions (and the first token, when ``skip_first``) are 0.
    """
    site = _sae_site(sae, site)
    check_sae_fits(sae, model, site)
    pieces = []
    for acts, keep in _site_activations(model, texts, site, batch_size, skip_first):
        encoded = sae.encode(acts.to(sae.device, sae.dtype)).float().cpu()
        pieces.append(encoded * keep.unsqueeze(-1).cpu())
    return torch.cat(pieces)


def top_features(
    activations: Float[Tensor, "batch pos d_sae"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    k: int = 10,
) -> Int[Tensor, " k"]:
    """Feature ids ranked by mean activation over the positions in ``mask`` (default: all).

    Padding is 0 in :func:`feature_activations`, so without a mask the ranking equals the
    ranking over real tokens. Pass e.g. the mask of a user's preference-driven tokens.
    """
    if activations.ndim != 3:
        raise VectorShapeError(
            f"activations must be [batch, pos, d_sae], got {tuple(activations.shape)}"
        )
    if mask is None:
        selected = activations.reshape(-1, activations.shape[-1])
    else:
        if mask.shape != activations.shape[:2]:
            raise VectorShapeError(
                f"mask must be [batch, pos] = {tuple(activations.shape[:2])}, got {tuple(mask.shape)}"
            )
        selected = activations[mask.to(activations.device)]
        if selected.shape[0] == 0:
            raise ValueError("the mask selects no positions")
    return selected.mean(dim=0).topk(min(k, activations.shape[-1])).indices


@torch.no_grad()
def explained_variance(
    model: Any, sae: SAE, texts: Inputs, site: str | None = None, *, batch_size: int = 16
) -> float:
    """Fraction of the activation variance the SAE reconstructs on ``texts``.

    ``1 - sum ||x - sae(x)||^2 / sum ||x - mean(x)||^2`` over real tokens, each row's first
    token (attention sink) excluded.
    """
    site = _sae_site(sae, site)
    check_sae_fits(sae, model, site)
    kept = []
    for acts, keep in _site_activations(model, texts, site, batch_size, skip_first=True):
        kept.append(acts[keep].to(sae.device, sae.dtype))
    x = torch.cat(kept)
    if x.shape[0] < 2:
        raise ValueError(
            "need at least two tokens (after the first of each text) to measure variance"
        )
    residual = (x - sae.decode(sae.encode(x))).pow(2).sum()
    return float(1 - residual / (x - x.mean(dim=0)).pow(2).sum())


# --------------------------------------------------------------------------------------------
# The projection as a backbone step
# --------------------------------------------------------------------------------------------


def attribution_scores(
    model: Any,
    site: str,
    sae: SAE,
    chosen: Sequence[SampleLike],
    rejected: Sequence[SampleLike],
    batch_size: int = 8,
) -> Float[Tensor, " d_sae"]:
    """Per-feature ``mean encode(pool h(chosen)) − mean encode(pool h(rejected))``.

    In SteerX mode the two sides are a user's texts and their minimal-pair twins, which differ
    only at the preference-driven tokens: the score of a feature is how much those tokens
    raise it, the feature choice for ``by="attribution"``.
    """
    tokenizer = get_adapter(model).tokenizer
    sides = []
    for name, samples in (("chosen", chosen), ("rejected", rejected)):
        pooled = pooled_activations(
            model, site, as_encoded(tokenizer, samples, name), batch_size=batch_size
        )
        sides.append(sae.encode(pooled.to(sae.device, sae.dtype)).float().cpu().mean(0))
    return sides[0] - sides[1]


def sae_projection(backbone: Backbone) -> Backbone:
    """``backbone`` followed by :func:`project_vector`: SAE projection as a step on any vector.

    The returned backbone takes three more options: ``sae`` (the SAE, or a function ``site ->
    SAE`` called only when a vector is projected, so a default SAE is loaded only when needed),
    ``sae_k`` (at most this many features) and ``sae_by`` (``"magnitude"``: the features that
    explain the vector; ``"attribution"``: the features the chosen side raises most over the
    rejected side, :func:`attribution_scores`). The SAE is checked against the model and site
    (:func:`check_sae_fits`) before each projection.
    """

    def projected(
        model: Any,
        site: str,
        chosen: Sequence[SampleLike],
        rejected: Sequence[SampleLike],
        *,
        sae: SAE | Callable[[str], SAE],
        sae_k: int = 32,
        sae_by: SelectBy = "magnitude",
        **options: Any,
    ) -> Float[Tensor, " d_model"]:
        vector = backbone(model, site, chosen, rejected, **options)
        resolved = sae if isinstance(sae, nn.Module) else sae(site)
        check_sae_fits(resolved, model, site)
        scores = None
        if sae_by == "attribution":
            batch_size = options.get("batch_size", 8)
            scores = attribution_scores(model, site, resolved, chosen, rejected, batch_size)
        return project_vector(vector, resolved, k=sae_k, by=sae_by, feature_scores=scores).vector

    return projected


def sae_backbone(
    model: Any,
    site: str,
    chosen: Sequence[SampleLike],
    rejected: Sequence[SampleLike],
    **options: Any,
) -> Float[Tensor, " d_model"]:
    """The ``"sae"`` backbone: the mean difference of the samples' texts, SAE-projected.

    Pinned tokens are dropped (each sample is encoded from its text), so a minimal-pair twin
    enters as its decoded text, as in ``"bipo"``, not token-exact as in ``"mean_diff"``; whole
    texts (``str``) and token ids keep their own tokens. Options: those of
    :func:`~steerx_lens.backbones.mean_diff.mean_diff_backbone` and of :func:`sae_projection`.
    """
    tokenizer = get_adapter(model).tokenizer
    chosen = [_from_text(s) for s in as_samples(tokenizer, chosen, "chosen")]
    rejected = [_from_text(s) for s in as_samples(tokenizer, rejected, "rejected")]
    return sae_projection(mean_diff_backbone)(model, site, chosen, rejected, **options)


def _from_text(sample: Sample) -> Sample:
    """``sample`` re-encoded from its text, unless its tokens are its text (exact tokens)."""
    return sample if sample.exact_tokens else Sample(sample.item)
