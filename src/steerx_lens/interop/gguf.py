"""GGUF control vectors in the layout llama.cpp reads (``--control-vector FILE``,
``--control-vector-scaled FILE SCALE`` of llama-cli, llama-server and the other tools built on
its ``common_init_from_params``).

Layer convention, read in llama.cpp's own source (ggerganov/llama.cpp, commit c392e50):

- ``common/common.cpp``, ``common_control_vector_load_one()`` (lines 1910-1993): every tensor
  must be named ``direction.{n}`` with an integer ``n >= 1`` (``direction.0`` is refused:
  "invalid (zero) direction tensor layer index"), 1-D, F32, all of one width; direction ``n``
  is stored at offset ``n_embd * (n - 1)`` ("layer 1 at [0]"), times the file's scale. No
  metadata is read. ``common_init_from_params()`` (lines 959-977) applies the sum of all files
  to layers 1 .. n_layer by default (``--control-vector-layer-range``).
- ``src/llama-adapter.cpp``, ``llama_adapter_cvec::init()`` / ``apply()`` (lines 31-134): that
  buffer fills ``tensors[il]`` for ``il = 1 .. n_layer - 1`` ("there's never a tensor for
  layer 0"); directions at ``n >= n_layer`` are silently dropped. ``apply_to(ctx, cur, il)``
  (line 22) adds ``tensors[il]`` to ``cur``.
- ``src/llama.cpp``, ``build_llama()`` (line 1613; every other architecture's graph builder
  does the same): ``cur = lctx.cvec.apply_to(ctx0, cur, il)`` right after the FFN residual add
  of layer ``il`` (0-based), before the tensor is named ``l_out``: the output of block ``il``.

So ``direction.{n}`` is added to the output of block ``n`` (0-based) at every position: our
``blocks.{n}.hook_resid_post``, for ``n`` in ``1 .. n_layers - 1``. The output of block 0
cannot be steered by llama.cpp, and only ``hook_resid_post`` sites can be exported.

Metadata as llama.cpp's ``cvector-generator`` writes it
(``examples/cvector-generator/cvector-generator.cpp``, ``export_gguf()``):
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's GGUF
architecture, e.g. ``"llama"``) and ``controlvector.layer_count`` (int32, the number of
directions). repeng's ``ControlVector.export_gguf`` writes the same keys (``layer_count`` as
uint32) and the same numbering (its key ``i`` is the output of block ``i``). Our files add
``steerx.vectors`` (each vector's steerx_lens metadata, JSON), which llama.cpp ignores and
:func:`import_gguf` uses to restore the vectors exactly.

The strength is not baked in: run ``--control-vector-scaled file.gguf ALPHA`` with the
vectors' ``alpha`` to reproduce ``hooks.run(model, text, *as_steers(vectors))``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerx_lens.atomic import write_bytes
from steerx_lens.errors import ModelMismatchError, VectorShapeError
from steerx_lens.interop._common import InteropError, imported, layers_by_kind, require
from steerx_lens.vectors import FORMAT_VERSION, SteeringVector, VectorFileError

ARCH = "controlvector"
METADATA_KEY = "steerx.vectors"
SITE_KIND = "hook_resid_post"
SOURCE = "gguf"


def export_gguf(vectors: Sequence[SteeringVector], path: str | Path, *, model_hint: str) -> Path:
    """Write our ``hook_resid_post`` vectors (one model, one per layer, none at block 0) as a
    llama.cpp control vector, atomically. ``model_hint`` is the model's GGUF architecture
    (``general.architecture`` of its GGUF file, e.g. ``"llama"``). Tensors are written as F32,
    the only type llama.cpp reads."""
    kind, layers = layers_by_kind(vectors, "GGUF control")
    if kind != SITE_KIND:
        raise InteropError(
            f"llama.cpp steers block outputs (hook_resid_post), not {kind}: a "
            "blocks.{l}.hook_resid_pre vector equals one at blocks.{l-1}.hook_resid_post"
        )
    if 0 in layers:
        raise InteropError(
            "llama.cpp never steers the output of block 0 (it refuses direction.0): export "
            "vectors at blocks.1 and later"
        )
    gguf = require("gguf", "pip install gguf")
    metadata = {f"direction.{v.layer}": v.metadata() for v in vectors}
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch) / "control_vector.gguf"
        writer = gguf.GGUFWriter(staging, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", len(layers))
        writer.add_string(METADATA_KEY, json.dumps(metadata))
        for layer, tensor in sorted(layers.items()):
            array = tensor.detach().cpu().to(torch.float32).numpy()
            writer.add_tensor(f"direction.{layer}", array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = staging.read_bytes()
    return write_bytes(path, data)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The metadata fields, the F32 1-D tensors by name and each tensor's problem (if any)."""
    gguf = require("gguf", "pip install gguf")
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
        tensors, problems = {}, {}
        for tensor in reader.tensors:
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
                problems[tensor.name] = "is not a 1-D F32 tensor (llama.cpp reads only those)"
            tensors[tensor.name] = torch.from_numpy(tensor.data.astype("float32").reshape(-1))
    except (ValueError, LookupError, OSError, OverflowError) as error:
        raise VectorFileError(
            f"{path} is not a readable GGUF file (truncated or corrupt): {error}"
        ) from error
    return fields, tensors, problems


def _direction_layer(name: str) -> int | None:
    """``n`` of a tensor named ``direction.{n}``, else None (as llama.cpp parses it)."""
    prefix, _, number = name.partition(".")
    return int(number) if prefix == "direction" and number.isdigit() else None


def import_gguf(path: str | Path, model: Any, *, alpha: float = 1.0) -> list[SteeringVector]:
    """Read a llama.cpp control vector as our vectors for ``model``, one per direction.

    ``direction.{n}`` becomes ``blocks.{n}.hook_resid_post`` (see the module docstring). Files
    written by :func:`export_gguf` give back the exported vectors exactly (tensors, alpha and
    provenance; the model must be the one they were made on); other files (llama.cpp's
    ``cvector-generator``, repeng) get ``alpha`` and ``backbone="gguf"``. A file whose width
    or layers do not fit the model is refused. Apply at every position (``as_steers``).
    """
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"no GGUF control vector at {path}")
    fields, tensors, problems = _read(path)
    architecture = fields.get("general.architecture")
    if architecture != ARCH:
        raise VectorFileError(
            f"{path} is a GGUF file of architecture {architecture!r}, not a control vector "
            f"({ARCH!r}): pass a file written by llama-cvector-generator, repeng or export_gguf"
        )
    count = fields.get(f"{ARCH}.layer_count")
    if count is not None and count != len(tensors):
        raise VectorFileError(
            f"{path} declares {count} directions but holds {len(tensors)} tensors (corrupt file)"
        )
    try:
        saved = json.loads(fields.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise VectorFileError(f"{path}: corrupt {METADATA_KEY} metadata ({error})") from error
    if not isinstance(saved, dict) or not all(isinstance(m, dict) for m in saved.values()):
        raise VectorFileError(
            f"{path}: corrupt {METADATA_KEY} metadata (not one object per tensor)"
        )
    vectors = []
    for name, tensor in sorted(tensors.items(), key=lambda item: _direction_layer(item[0]) or 0):
        layer = _direction_layer(name)
        if layer is None or layer == 0 or name in problems:
            why = problems.get(
                name, "is not named direction.{n} with n >= 1 (llama.cpp refuses it)"
            )
            raise VectorFileError(f"{path}: tensor {name!r} {why}")
        extra = {"layer": layer, "gguf_model_hint": fields.get(f"{ARCH}.model_hint")}
        try:
            vector = imported(tensor, layer, SITE_KIND, model, SOURCE, alpha, extra)
        except (InteropError, VectorShapeError) as error:
            raise VectorFileError(f"{path}: {error}") from error
        if name in saved:
            vector = _restored(path, tensor, saved[name], vector)
        vectors.append(vector)
    return vectors


def _restored(
    path: Path, tensor: torch.Tensor, meta: dict[str, Any], found: SteeringVector
) -> SteeringVector:
    """The vector exported by :func:`export_gguf`, rebuilt from its saved metadata."""
    meta = dict(meta)
    version = meta.pop("format_version", None)
    meta.pop("d_model", None)
    meta.pop("dtype", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise VectorFileError(
            f"{path} has vector format version {version}; this steerx_lens reads up to "
            f"{FORMAT_VERSION}: upgrade steerx_lens"
        )
    if meta.get("site") != found.site:
        raise VectorFileError(f"{path}: metadata site {meta.get('site')!r} is not {found.site}")
    if meta.get("model_fingerprint") != found.model_fingerprint:
        raise ModelMismatchError(
            f"{path} was made on model {meta.get('model_fingerprint')}, not on "
            f"{found.model_fingerprint}: import it on the model it was made on"
        )
    try:
        return SteeringVector(vector=tensor, **meta)
    except TypeError as error:
        raise VectorFileError(f"{path}: corrupt {METADATA_KEY} metadata ({error})") from error
