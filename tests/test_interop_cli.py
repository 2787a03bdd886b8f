"""``steerx export`` / ``steerx import``: vectors out to llama.cpp / steering-vectors and back,
bit for bit, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from typer.testing import CliRunner

from steerx_lens.backends import get_adapter
from steerx_lens.cli import app
from steerx_lens.models import load_tiny_model
from steerx_lens.vectors import SteeringVector


def vector_files(folder: Path) -> list[Path]:
    fingerprint = get_adapter(load_tiny_model("hf")).fingerprint()
    paths = []
    for layer in (0, 1):
        vector = SteeringVector(
            torch.linspace(-1, 1, 64) * (layer + 1),
            f"blocks.{layer}.hook_resid_post",
            fingerprint,
            alpha=2.0,
        )
        paths.append(vector.save(folder / f"v{layer}.safetensors"))
    return paths


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("gguf", ".gguf"), ("steering-vectors", ".safetensors")]
)
def test_export_then_import_is_bit_exact(tmp_path: Path, fmt: str, suffix: str) -> None:
    paths = vector_files(tmp_path)
    if fmt == "gguf":  # llama.cpp cannot steer block 0's output: export block 1 only
        paths = paths[1:]
    exported = tmp_path / f"out{suffix}"
    result = CliRunner().invoke(
        app, ["export", *map(str, paths), "--format", fmt, "--out", str(exported)]
    )
    assert result.exit_code == 0, result.output
    if fmt == "gguf":
        reader = gguf.GGUFReader(exported)
        assert [t.name for t in reader.tensors] == ["direction.1"]
    back = tmp_path / "back"
    result = CliRunner().invoke(app, ["import", str(exported), "--tiny", "--out", str(back)])
    assert result.exit_code == 0, result.output
    for path in paths:
        original = SteeringVector.load(path)
        (again,) = [SteeringVector.load(p) for p in back.glob(f"*{original.site}*")]
        assert torch.equal(again.vector, original.vector)
        if fmt == "gguf":  # our own metadata travels in the GGUF header
            assert (again.backbone, again.alpha) == (original.backbone, original.alpha)
        else:  # foreign vectors are marked to be applied at every position
            assert again.extra["positions"] == "all"


def test_export_refuses_an_unknown_format(tmp_path: Path) -> None:
    paths = vector_files(tmp_path)
    result = CliRunner().invoke(app, ["export", str(paths[1]), "--format", "onnx", "--out", "x"])
    assert result.exit_code != 0
    assert "--format" in result.output
    assert not Path("x").exists()
