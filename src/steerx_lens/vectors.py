"""Steering vectors with the metadata needed to apply, compare and share them safely.

A :class:`SteeringVector` is a ``[d_model]`` tensor plus where it belongs (site, layer, the
model's fingerprint) and how it was made (backbone, ``baseline``/``steerx`` mode, description).
Files are safetensors with the metadata stored in the safetensors header (one JSON string under
the key ``"steerx"``), written atomically; the same vector gives the same bytes (no creation time
unless one is set). Loading checks the format version, the metadata against
:data:`METADATA_SCHEMA` (unknown keys are ignored with a warning, missing or mistyped ones
refused), the tensor against its recorded width and dtype and, when a model is given, the model
fingerprint.

A :class:`SteeringVectorSet` holds vectors at several sites of one model (e.g. one per layer),
applied together and saved to one file (one tensor per site). ``residual_norm``, when recorded,
is the median residual norm at the vector's site: :meth:`SteeringVector.relative_alpha` turns a
strength relative to it into an absolute ``alpha``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, overload

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.atomic import write_bytes
from steerx_lens.core import SITE_KINDS
from steerx_lens.errors import (
    ModelMismatchError,
    NonFiniteError,
    ResidualNormError,
    SteerXError,
    VectorShapeError,
)
from steerx_lens.hooks import Positions, Steer

FORMAT_VERSION = 1
TENSOR_KEY = "vector"
METADATA_KEY = "steerx"
SET_METADATA_KEY = "steerx.set"
"""Header key of a :class:`SteeringVectorSet` file (a JSON object: ``format_version``,
``sites`` in order, ``vectors``: each site's :meth:`SteeringVector.metadata`)."""
Mode = Literal["baseline", "steerx", "shared", "other"]
_TEXT = (str,)
_OPTIONAL_TEXT = (str, type(None))
METADATA_SCHEMA: dict[str, tuple[type, ...]] = {
    "site": _TEXT,
    "model_fingerprint": _TEXT,
    "backbone": _TEXT,
    "mode": _TEXT,
    "alpha": (int, float),
    "user_id": _OPTIONAL_TEXT,
    "description": _OPTIONAL_TEXT,
    "extra": (dict,),
    "library_version": _TEXT,
    "format_version": (int,),
    "d_model": (int,),
    "dtype": _TEXT,
}
"""Required keys of a vector file's metadata and their JSON types (``created`` and
``residual_norm``, numbers, are optional: files written before ``residual_norm`` existed load
with ``None``)."""
OPTIONAL_METADATA: dict[str, tuple[type, ...]] = {
    "created": (int, float, type(None)),
    "residual_norm": (int, float, type(None)),
}


class VectorFileError(SteerXError, ValueError):
    """A vector file that is missing, truncated, corrupt or from a newer format version."""


def library_version() -> str:
    """The installed steerx-lens version (recorded in every vector file)."""
    try:
        return version("steerx-lens")
    except PackageNotFoundError:  # running from a source tree without installation
        return "unknown"


@dataclass(frozen=True)
class SteeringVector:
    """A steering direction at one site of one model, with its provenance."""

    vector: Float[Tensor, " d_model"]
    site: str
    model_fingerprint: str
    backbone: str = "mean_diff"
    mode: Mode = "baseline"
    alpha: float = 1.0
    user_id: str | None = None
    description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    library_version: str = field(default_factory=library_version)
    created: float | None = None
    residual_norm: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor) or self.vector.ndim != 1:
            raise VectorShapeError("SteeringVector.vector must be a 1-D tensor [d_model]")
        if not torch.isfinite(self.vector).all():
            raise NonFiniteError(f"steering vector for {self.site} contains NaN or infinity")
        norm = self.residual_norm
        if norm is not None and (
            isinstance(norm, bool)
            or not isinstance(norm, (int, float))
            or not math.isfinite(norm)
            or norm <= 0
        ):
            raise ResidualNormError(
                f"residual_norm must be a finite number > 0 (the median residual norm at "
                f"{self.site}), got {norm!r}"
            )
        if self.d_model != self.fingerprint_d_model:
            raise VectorShapeError(
                f"vector width {self.d_model} does not match the model fingerprint "
                f"{self.model_fingerprint} (d_model {self.fingerprint_d_model})"
            )

    # ------------------------------------------------------------------ description
    @property
    def d_model(self) -> int:
        """Width of the vector."""
        return int(self.vector.shape[0])

    @property
    def fingerprint_d_model(self) -> int:
        """d_model as recorded in the fingerprint ``n_layers x d_model : hash``."""
        try:
            return int(self.model_fingerprint.split(":")[0].split("x")[1])
        except (IndexError, ValueError) as error:
            raise ValueError(f"malformed model fingerprint {self.model_fingerprint!r}") from error

    @property
    def layer(self) -> int | None:
        """The block index of the site (None for ``hook_embed``)."""
        parts = self.site.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    # ------------------------------------------------------------------ arithmetic
    def _with(self, vector: Tensor, **changes: Any) -> SteeringVector:
        return replace(self, vector=vector, created=None, **changes)

    def _check_compatible(self, other: SteeringVector) -> None:
        if (other.site, other.model_fingerprint) != (self.site, self.model_fingerprint):
            raise ModelMismatchError(
                f"cannot combine a vector at {other.site} on {other.model_fingerprint} with one "
                f"at {self.site} on {self.model_fingerprint}"
            )

    def __add__(self, other: SteeringVector) -> SteeringVector:
        self._check_compatible(other)
        return self._with(self.vector + other.vector.to(self.vector))

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        self._check_compatible(other)
        return self._with(self.vector - other.vector.to(self.vector))

    def __mul__(self, scale: float) -> SteeringVector:
        return self._with(self.vector * float(scale))

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def norm(self) -> float:
        """Euclidean norm of the vector."""
        return float(self.vector.norm())

    def normalized(self) -> SteeringVector:
        """The unit-norm vector (raises on a zero vector)."""
        norm = self.norm()
        if norm == 0.0:
            raise VectorShapeError("cannot normalize a zero vector")
        return self._with(self.vector / norm)

    def cosine(self, other: SteeringVector) -> float:
        """Cosine similarity with a vector at the same site of the same model."""
        self._check_compatible(other)
        return float(torch.nn.functional.cosine_similarity(self.vector, other.vector, dim=0))

    # ------------------------------------------------------------------ strength
    def relative_alpha(self, fraction: float) -> float:
        """The absolute ``alpha`` with ``‖alpha·vector‖ = fraction · residual_norm``.

        ``fraction`` is the strength relative to the median residual norm at the site (e.g.
        0.1 = a tenth of a typical activation; negative steers the other way). Raises
        :class:`ResidualNormError` when :attr:`residual_norm` is unknown, or for a zero vector.
        """
        if self.residual_norm is None:
            raise ResidualNormError(
                f"the vector at {self.site} has no residual_norm, so a relative strength cannot "
                "be converted: give an absolute alpha, or record the norm (residual_norm=..., "
                "from steerx_lens.backbones.mean_diff.residual_norm)"
            )
        if not math.isfinite(fraction):
            raise ResidualNormError(f"relative strength must be finite, got {fraction}")
        norm = self.norm()
        if norm == 0.0:
            raise ResidualNormError(f"the vector at {self.site} is zero: no strength scales it")
        return float(fraction) * self.residual_norm / norm

    def scaled_to(self, fraction: float) -> SteeringVector:
        """This vector with ``alpha`` set by :meth:`relative_alpha` (the tensor is unchanged)."""
        return replace(self, alpha=self.relative_alpha(fraction), created=None)

    def _alpha(self, alpha: float | None, relative: float | None) -> float:
        """The absolute strength from ``alpha`` or ``relative`` (at most one), else ours."""
        if alpha is not None and relative is not None:
            raise ValueError("give alpha (absolute) or relative (to the residual norm), not both")
        if relative is not None:
            return self.relative_alpha(relative)
        return self.alpha if alpha is None else alpha

    # ------------------------------------------------------------------ use
    def check_model(self, model: Any) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the model this vector is for."""
        from steerx_lens.backends import get_adapter

        fingerprint = get_adapter(model).fingerprint()
        if fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"this vector was made on model {self.model_fingerprint}, not on {fingerprint}"
            )

    @property
    def default_positions(self) -> Positions:
        """Where this vector steers unless told otherwise: ``extra["positions"]`` when recorded
        (``"all"`` for vectors imported from steering-vectors, repeng or llama.cpp, which steer
        every token), else the last prompt token and every generated token."""
        return self.extra.get("positions", "prompt_last_and_generated")

    def to_steer(
        self,
        alpha: float | None = None,
        positions: Positions | None = None,
        *,
        relative: float | None = None,
    ) -> Steer:
        """A :class:`hooks.Steer` (fingerprint-checked when applied); ``alpha`` defaults to ours,
        ``positions`` to :attr:`default_positions`; ``relative`` instead of ``alpha`` gives the
        strength relative to the residual norm (:meth:`relative_alpha`)."""
        return Steer(
            self.site,
            self.vector,
            alpha=self._alpha(alpha, relative),
            positions=self.default_positions if positions is None else positions,
            model_fingerprint=self.model_fingerprint,
        )

    @contextmanager
    def apply(
        self,
        model: Any,
        alpha: float | None = None,
        positions: Positions | None = None,
        *,
        relative: float | None = None,
    ) -> Iterator[Any]:
        """Steer every forward call of ``model`` inside the block (hooks removed on exit, also
        on error), like ``steering_vectors.SteeringVector.apply``. Yields the backend adapter."""
        with hooks.apply(model, self.to_steer(alpha, positions, relative=relative)) as adapter:
            yield adapter

    def generate(
        self,
        model: Any,
        prompts: str | Sequence[str],
        alpha: float | None = None,
        positions: Positions | None = None,
        max_new_tokens: int = 40,
        *,
        relative: float | None = None,
    ) -> list[str]:
        """Greedy completions of ``prompts`` (used as given: wrap them in the chat template
        with :func:`steerx_lens.text.build_prompt` first where the model expects it)."""
        steer = self.to_steer(alpha, positions, relative=relative)
        return hooks.generate(model, prompts, steer, max_new_tokens=max_new_tokens).texts

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON header stored under ``"steerx"``: every field but the tensor (``created``
        and ``residual_norm`` only when set), plus ``format_version``, ``d_model`` and
        ``dtype``."""
        data = asdict(self)
        data.pop("vector")
        for optional in OPTIONAL_METADATA:
            if data[optional] is None:
                data.pop(optional)
        data["format_version"] = FORMAT_VERSION
        data["d_model"] = self.d_model
        data["dtype"] = str(self.vector.dtype).removeprefix("torch.")
        return data

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically (temporary file + rename in the same folder)."""
        data = save(
            {TENSOR_KEY: self.vector.detach().cpu().contiguous()},
            metadata={METADATA_KEY: json.dumps(self.metadata())},
        )
        return write_bytes(path, data)

    @classmethod
    def from_metadata(cls, vector: Tensor, meta: Any, where: str = "vector") -> SteeringVector:
        """The vector of a file's ``tensor`` and metadata, both checked; ``where`` names the
        file in errors.

        Raises :class:`VectorFileError` for a newer format version, a missing or mistyped key
        of :data:`METADATA_SCHEMA`, a tensor that is not 1-D floating point, or a tensor whose
        width or dtype differs from the recorded ``d_model`` / ``dtype`` or from the model
        fingerprint. Unknown keys (written by a newer steerx_lens) are ignored with a warning.
        """
        if not isinstance(meta, dict):
            raise VectorFileError(f"{where}: the metadata is not a JSON object")
        found = meta.get("format_version")
        if not isinstance(found, int) or isinstance(found, bool) or found > FORMAT_VERSION:
            raise VectorFileError(
                f"{where} has vector format version {found}; this steerx_lens reads up to "
                f"{FORMAT_VERSION}: upgrade steerx_lens"
            )
        missing = sorted(set(METADATA_SCHEMA) - set(meta))
        if missing:
            raise VectorFileError(f"{where}: metadata key(s) {missing} missing")
        schema = {**METADATA_SCHEMA, **OPTIONAL_METADATA}
        unknown = sorted(set(meta) - set(schema))
        if unknown:
            warnings.warn(
                f"{where}: ignored unknown metadata key(s) {unknown} (a newer steerx_lens?)",
                stacklevel=2,
            )
        for key, types in schema.items():
            value = meta.get(key)
            if key in meta and (not isinstance(value, types) or isinstance(value, bool)):
                raise VectorFileError(
                    f"{where}: metadata {key!r} has the wrong type: {value!r:.60}"
                )
        if not math.isfinite(meta["alpha"]):
            raise VectorFileError(f"{where}: metadata 'alpha' is not finite: {meta['alpha']}")
        norm = meta.get("residual_norm")
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise VectorFileError(f"{where}: metadata 'residual_norm' is not > 0: {norm}")
        dtype = str(vector.dtype).removeprefix("torch.")
        if vector.ndim != 1 or not vector.is_floating_point():
            raise VectorFileError(
                f"{where}: the tensor must be 1-D floating point, got {dtype} {tuple(vector.shape)}"
            )
        if (meta["d_model"], meta["dtype"]) != (vector.shape[0], dtype):
            raise VectorFileError(
                f"{where}: the tensor is {dtype} of width {vector.shape[0]}, the metadata says "
                f"{meta['dtype']} of width {meta['d_model']}"
            )
        fields = {
            key: meta[key] for key in schema if key in meta and key in cls.__dataclass_fields__
        }
        try:
            width = int(meta["model_fingerprint"].split(":")[0].split("x")[1])
        except (IndexError, ValueError):
            raise VectorFileError(
                f"{where}: malformed model fingerprint {meta['model_fingerprint']!r}"
            ) from None
        if width != vector.shape[0]:
            raise VectorFileError(
                f"{where}: the tensor has width {vector.shape[0]} but the model fingerprint "
                f"{meta['model_fingerprint']} says d_model {width}"
            )
        return cls(vector=vector, **fields)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> SteeringVector:
        """Read a vector file (checked by :meth:`from_metadata`); with ``model``, also check it
        was made on that model."""
        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"no vector file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensor = handle.get_tensor(TENSOR_KEY) if TENSOR_KEY in handle.keys() else None
        except (SafetensorError, OSError, ValueError) as error:
            raise VectorFileError(
                f"{path} is not a readable vector file (truncated or corrupt): {error}"
            ) from error
        if SET_METADATA_KEY in header:
            raise VectorFileError(
                f"{path} holds vectors at several sites: load it with SteeringVectorSet.load"
            )
        if METADATA_KEY not in header or tensor is None:
            raise VectorFileError(f"{path} is a safetensors file but not a steerx_lens vector")
        try:
            meta = json.loads(header[METADATA_KEY])
        except (json.JSONDecodeError, RecursionError) as error:
            raise VectorFileError(f"{path}: corrupt metadata ({error})") from error
        vector = cls.from_metadata(tensor, meta, str(path))
        if model is not None:
            vector.check_model(model)
        return vector


# ---------------------------------------------------------------------------------- several sites


class VectorSetError(SteerXError, ValueError):
    """Vectors that cannot form one :class:`SteeringVectorSet`: none, not
    :class:`SteeringVector` s, or two at the same site."""


def _site_order(site: str) -> tuple[int, int, str]:
    """Execution order of a site name: embeddings, then by layer, then pre < attn < mid < mlp <
    post; other names last, alphabetically."""
    if site == "hook_embed":
        return (-1, -1, "")
    parts = site.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in SITE_KINDS:
        return (int(parts[1]), SITE_KINDS.index(parts[2]), "")
    return (1 << 30, 0, site)


@dataclass(frozen=True, eq=False)
class SteeringVectorSet(Sequence[SteeringVector]):
    """Vectors at several sites of one model (e.g. one per layer), applied together.

    Build it from any iterable of :class:`SteeringVector` s at distinct sites with one model
    fingerprint; they are kept in execution order (by layer, then site kind). It is a sequence
    of its vectors (``len``, iteration, ``set[0]``, ``set["blocks.3.hook_resid_post"]``), so it
    goes wherever a list of vectors goes (``interop.to_repeng``, ``export_gguf``, ...). Every
    entry point of :mod:`steerx_lens.hooks` accepts it as one intervention-like argument
    (:meth:`to_steers`). Files hold one tensor per site, named by the site.
    """

    vectors: tuple[SteeringVector, ...]

    def __post_init__(self) -> None:
        vectors = tuple(self.vectors)
        if not vectors:
            raise VectorSetError("a SteeringVectorSet needs at least one SteeringVector")
        wrong = [type(v).__name__ for v in vectors if not isinstance(v, SteeringVector)]
        if wrong:
            raise VectorSetError(f"a SteeringVectorSet holds SteeringVectors, got {wrong}")
        fingerprints = sorted({v.model_fingerprint for v in vectors})
        if len(fingerprints) > 1:
            raise ModelMismatchError(
                f"a SteeringVectorSet belongs to one model, these vectors come from "
                f"{fingerprints}: keep each model's vectors in its own set"
            )
        sites = [v.site for v in vectors]
        repeated = sorted({site for site in sites if sites.count(site) > 1})
        if repeated:
            raise VectorSetError(
                f"two vectors at site(s) {repeated}: add the vectors of one site together "
                "first (v1 + v2)"
            )
        object.__setattr__(
            self, "vectors", tuple(sorted(vectors, key=lambda v: _site_order(v.site)))
        )

    # ------------------------------------------------------------------ sequence
    def __len__(self) -> int:
        return len(self.vectors)

    def __iter__(self) -> Iterator[SteeringVector]:
        return iter(self.vectors)

    @overload
    def __getitem__(self, key: int | str) -> SteeringVector: ...

    @overload
    def __getitem__(self, key: slice) -> Sequence[SteeringVector]: ...

    def __getitem__(self, key: int | str | slice) -> SteeringVector | Sequence[SteeringVector]:
        """The vector at position ``key``, or at the site named ``key``."""
        if isinstance(key, str):
            for vector in self.vectors:
                if vector.site == key:
                    return vector
            raise KeyError(f"no vector at site {key!r}; this set has {list(self.sites)}")
        return self.vectors[key]

    def __repr__(self) -> str:
        return f"SteeringVectorSet(sites={list(self.sites)}, model={self.model_fingerprint})"

    # ------------------------------------------------------------------ description
    @property
    def sites(self) -> tuple[str, ...]:
        """The vectors' sites, in execution order."""
        return tuple(v.site for v in self.vectors)

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint of the model every vector was made on."""
        return self.vectors[0].model_fingerprint

    def check_model(self, model: Any) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the model these are for."""
        self.vectors[0].check_model(model)

    def scaled_to(self, fraction: float) -> SteeringVectorSet:
        """Each vector with ``alpha`` set by its own :meth:`SteeringVector.relative_alpha`."""
        return SteeringVectorSet(tuple(v.scaled_to(fraction) for v in self.vectors))

    # ------------------------------------------------------------------ use
    def to_steers(
        self,
        alpha: float | None = None,
        positions: Positions | None = None,
        *,
        relative: float | None = None,
    ) -> list[Steer]:
        """One :class:`hooks.Steer` per vector (:meth:`SteeringVector.to_steer`): ``alpha``
        (or ``relative``, each to its own site's norm) and ``positions`` apply to every vector;
        None keeps each vector's own."""
        return [v.to_steer(alpha, positions, relative=relative) for v in self.vectors]

    @contextmanager
    def apply(
        self,
        model: Any,
        alpha: float | None = None,
        positions: Positions | None = None,
        *,
        relative: float | None = None,
    ) -> Iterator[Any]:
        """Steer every forward call of ``model`` inside the block at all sites at once (hooks
        removed on exit, also on error). Yields the backend adapter."""
        steers = self.to_steers(alpha, positions, relative=relative)
        with hooks.apply(model, *steers) as adapter:
            yield adapter

    def generate(
        self,
        model: Any,
        prompts: str | Sequence[str],
        alpha: float | None = None,
        positions: Positions | None = None,
        max_new_tokens: int = 40,
        *,
        relative: float | None = None,
    ) -> list[str]:
        """Greedy completions of ``prompts`` steered at every site (prompts used as given)."""
        steers = self.to_steers(alpha, positions, relative=relative)
        return hooks.generate(model, prompts, *steers, max_new_tokens=max_new_tokens).texts

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON header stored under :data:`SET_METADATA_KEY`."""
        return {
            "format_version": FORMAT_VERSION,
            "sites": list(self.sites),
            "vectors": {v.site: v.metadata() for v in self.vectors},
        }

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (one tensor per site, named by the site) atomically."""
        tensors = {v.site: v.vector.detach().cpu().contiguous() for v in self.vectors}
        data = save(tensors, metadata={SET_METADATA_KEY: json.dumps(self.metadata())})
        return write_bytes(path, data)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], meta: Any, where: str = "vector set"
    ) -> SteeringVectorSet:
        """The set of a file's ``{site: tensor}`` and :data:`SET_METADATA_KEY` metadata, each
        vector checked by :meth:`SteeringVector.from_metadata`; :class:`VectorFileError` when
        they do not fit together."""
        if not isinstance(meta, dict):
            raise VectorFileError(f"{where}: the metadata is not a JSON object")
        found = meta.get("format_version")
        if not isinstance(found, int) or isinstance(found, bool) or found > FORMAT_VERSION:
            raise VectorFileError(
                f"{where} has vector format version {found}; this steerx_lens reads up to "
                f"{FORMAT_VERSION}: upgrade steerx_lens"
            )
        sites, vectors = meta.get("sites"), meta.get("vectors")
        if not isinstance(sites, list) or not isinstance(vectors, dict):
            raise VectorFileError(f"{where}: metadata needs a 'sites' list and a 'vectors' object")
        if not sites or sorted(map(str, sites)) != sorted(vectors) or set(vectors) != set(tensors):
            raise VectorFileError(
                f"{where}: the tensors {sorted(tensors)} do not match the metadata's sites "
                f"{sorted(vectors)} (corrupt or edited file)"
            )
        loaded = []
        for site in sorted(vectors):
            vector = SteeringVector.from_metadata(tensors[site], vectors[site], f"{where} [{site}]")
            if vector.site != site:
                raise VectorFileError(f"{where}: tensor {site!r} has metadata site {vector.site!r}")
            loaded.append(vector)
        try:
            return cls(tuple(loaded))
        except (ModelMismatchError, VectorSetError) as error:
            raise VectorFileError(f"{where}: {error}") from error

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> SteeringVectorSet:
        """Read a file written by :meth:`save` (a single-vector file gives a set of one); with
        ``model``, also check the vectors were made on it. Any problem with the file raises a
        one-line :class:`VectorFileError`."""
        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"no vector file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if SET_METADATA_KEY not in header:
                    single = True
                    tensors: dict[str, Tensor] = {}
                else:
                    single = False
                    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise VectorFileError(
                f"{path} is not a readable vector file (truncated or corrupt): {error}"
            ) from error
        if single:
            vectors = cls((SteeringVector.load(path),))
        else:
            try:
                meta = json.loads(header[SET_METADATA_KEY])
            except (json.JSONDecodeError, RecursionError) as error:
                raise VectorFileError(f"{path}: corrupt metadata ({error})") from error
            vectors = cls.from_tensors(tensors, meta, str(path))
        if model is not None:
            vectors.check_model(model)
        return vectors


def as_vector_set(vectors: SteeringVector | Iterable[SteeringVector]) -> SteeringVectorSet:
    """``vectors`` (one vector, a list of them, or a set) as a :class:`SteeringVectorSet`."""
    if isinstance(vectors, SteeringVectorSet):
        return vectors
    if isinstance(vectors, SteeringVector):
        return SteeringVectorSet((vectors,))
    return SteeringVectorSet(tuple(vectors))
