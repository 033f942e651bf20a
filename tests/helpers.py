"""Tiny random-init models and data shared by the tests (fast: hidden 32–64, 2 layers)."""

from __future__ import annotations

import torch

from lorite.optim.invariance import effective_deltas as deltas  # noqa: F401  (re-exported for tests)
from lorite.optim.invariance import (
    invariance_deviation,
    random_transform,
    reparameterize,  # noqa: F401
    scalar_transform,
)
from lorite.optim.invariance import relative_gap as max_relative_gap  # noqa: F401


def tiny_llama(dtype=torch.float32, seed=0, vocab=64, hidden=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_peft(dtype=torch.float32, seed=0, r=4, random_B=True, hidden=32, **lora_kwargs):
    """A tiny Llama with peft LoRA on all linear layers; B randomised so that B·A ≠ 0 (unless told)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(dtype=dtype, seed=seed, hidden=hidden)
    lora_kwargs.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if random_B:
        from lorite.optim import find_lora_pairs

        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for pair in find_lora_pairs(model).pairs:
                pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=gen, dtype=pair.B.dtype))
    return model


def batches(n_steps, seed=0, batch=4, seq=16, vocab=64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n_steps)]


def lm_step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


general_T = random_transform(seed=100)  # a well-conditioned random T per pair
scalar_T = scalar_transform(1e3)  # (A/s, s·B) with s = 1000


def invariance_gap(base, make_optimizer, transform, data, before_step=None):
    """(deviation, movement) of ``make_optimizer`` between ``base`` and its reparameterised twin."""
    lm_batches = [{"input_ids": ids, "labels": ids} for ids in data]
    return invariance_deviation(base, make_optimizer, lm_batches, transform, before_step)


# ---------------------------------------------------------------- a tiny local "model directory"
def tiny_model_dir(path, seed=0, hidden=32, layers=2):
    """A random-init Llama with a character-level tokenizer and a chat template, saved as a local Hugging
    Face model directory: what ``--model PATH`` accepts, small enough for CPU tests."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<bos>", *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=1, pad_token_id=0, bos_token_id=2, tie_word_embeddings=True,
        initializer_range=0.3,  # with the default 0.02, RMSNorm caps every logit near 0.6: nothing can be learned
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_task(path, kind="multiple_choice", n=120, seed=0):
    """A BIG-bench-format task.json that a tiny model can learn: the answer is the input's first word."""
    import json
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "gold"]
    examples = []
    for _ in range(n):
        first = rng.choice(words)
        text = f"{first} {' '.join(rng.choice(words) for _ in range(3))}"
        if kind == "multiple_choice":
            examples.append({"input": text, "target_scores": {w: int(w == first) for w in words}})
        else:
            examples.append({"input": text, "target": [first]})
    data = {
        "name": "first_word",
        "description": "say the first word",
        "task_prefix": "First word?",
        "metrics": ["multiple_choice_grade" if kind == "multiple_choice" else "exact_str_match"],
        "examples": examples,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def killed_by_signal(launcher_stderr: str) -> bool:
    """Whether torchrun's report of a failed launch names only workers killed by a signal (``exitcode: -6``,
    gloo's native abort) and no worker that exited with an error of its own (a positive exit code)."""
    import re

    codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", launcher_stderr)]
    return bool(codes) and all(code < 0 for code in codes)


def run_lorite(args, processes=1, accelerate_flags=None, env=None, timeout=900):
    """``python -m lorite.cli ARGS`` in a subprocess: alone, under ``torchrun`` (``processes > 1``), or under
    ``accelerate launch`` with ``accelerate_flags``; accelerate's variables from this environment are
    dropped. Asserts success and returns the completed process.

    As in :func:`spawn_ranks`: gloo occasionally aborts a worker inside torch's native code. A multi-process
    run whose workers died only by a signal runs once more from scratch (its ``--out`` removed); a run that
    resumes (``--resume``) is not repeated, and a worker's own error never is."""
    import os
    import shutil
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
    command = [sys.executable, "-m", "lorite.cli", *args]
    if accelerate_flags is not None:  # accelerate's own launcher (torchrun underneath)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", *accelerate_flags, f"--num_processes={processes}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
            "-m", "lorite.cli", *args,
        ]  # fmt: skip
    elif processes > 1:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
            f"--master-port={free_port()}", "-m", "lorite.cli", *args,
        ]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    fresh_run = "--out" in args and "--resume" not in args
    if result.returncode != 0 and processes > 1 and fresh_run and killed_by_signal(result.stderr):
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def spawn_ranks(worker, args, nprocs, outputs, reset=()):
    """``torch.multiprocessing.spawn(worker, args, nprocs)`` for the gloo tests.

    gloo occasionally aborts a worker inside torch's native code, mostly at shutdown (glibc's "malloc():
    unaligned tcache chunk detected", "terminate called without an active exception"; about one full-suite
    run in five on the 2-core CI machine). A worker killed by a *signal* is therefore accepted when every
    path in ``outputs`` exists (its work was done and saved); otherwise everything runs once more, after the
    paths in ``outputs`` and ``reset`` are removed. A Python exception in a worker is never retried, and the
    caller's assertions on the outputs always run."""
    import shutil
    from pathlib import Path

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        try:
            mp.spawn(worker, args=args, nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as error:
            if error.signal_name is None:
                raise
            if all(Path(p).exists() for p in outputs):
                return
            if attempt == 2:
                raise
            for path in [*outputs, *reset]:
                path = Path(path)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
