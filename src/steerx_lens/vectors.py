"""Steering vectors with the metadata needed to apply, compare and share them safely.

A :class:`SteeringVector` is a ``[d_model]`` tensor plus where it belongs (site, layer, the
model's fingerprint) and how it was made (backbone, ``baseline``/``steerx`` mode, description).
Files are safetensors with the metadata stored in the safetensors header (one JSON string under
the key ``"steerx"``), written atomically; the same vector gives the same bytes (no creation time
unless one is set). Loading checks the format version, the metadata against
:data:`METADATA_SCHEMA` (unknown keys are ignored with a warning, missing or mistyped ones
refused), the tensor against its recorded width and dtype and, when a model is given, the model
fingerprint.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from steerx_lens import hooks
from steerx_lens.atomic import write_bytes
from steerx_lens.errors import ModelMismatchError, NonFiniteError, SteerXError, VectorShapeError
from steerx_lens.hooks import Positions, Steer

FORMAT_VERSION = 1
TENSOR_KEY = "vector"
METADATA_KEY = "steerx"
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
"""Required keys of a vector file's metadata and their JSON types (``created``, a number, is
optional)."""
OPTIONAL_METADATA: dict[str, tuple[type, ...]] = {"created": (int, float, type(None))}


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

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor) or self.vector.ndim != 1:
            raise VectorShapeError("SteeringVector.vector must be a 1-D tensor [d_model]")
        if not torch.isfinite(self.vector).all():
            raise NonFiniteError(f"steering vector for {self.site} contains NaN or infinity")
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

    def to_steer(self, alpha: float | None = None, positions: Positions | None = None) -> Steer:
        """A :class:`hooks.Steer` (fingerprint-checked when applied); ``alpha`` defaults to ours,
        ``positions`` to :attr:`default_positions`."""
        return Steer(
            self.site,
            self.vector,
            alpha=self.alpha if alpha is None else alpha,
            positions=self.default_positions if positions is None else positions,
            model_fingerprint=self.model_fingerprint,
        )

    @contextmanager
    def apply(
        self, model: Any, alpha: float | None = None, positions: Positions | None = None
    ) -> Iterator[Any]:
        """Steer every forward call of ``model`` inside the block (hooks removed on exit, also
        on error), like ``steering_vectors.SteeringVector.apply``. Yields the backend adapter."""
        with hooks.apply(model, self.to_steer(alpha, positions)) as adapter:
            yield adapter

    def generate(
        self,
        model: Any,
        prompts: str | Sequence[str],
        alpha: float | None = None,
        positions: Positions | None = None,
        max_new_tokens: int = 40,
    ) -> list[str]:
        """Greedy completions of ``prompts`` (used as given: wrap them in the chat template
        with :func:`steerx_lens.text.build_prompt` first where the model expects it)."""
        steer = self.to_steer(alpha, positions)
        return hooks.generate(model, prompts, steer, max_new_tokens=max_new_tokens).texts

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON header stored under ``"steerx"``: every field but the tensor (``created``
        only when set), plus ``format_version``, ``d_model`` and ``dtype``."""
        data = asdict(self)
        data.pop("vector")
        if data["created"] is None:
            data.pop("created")
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
