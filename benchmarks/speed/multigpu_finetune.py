"""Multi-GPU fine-tuning throughput (issue 14): ``lorite finetune`` under ``torchrun`` on 1, 2, 4… GPUs,
DDP and FSDP2, for SmolLM2-135M-Instruct and a Gemma-2B-shaped model, AdamW and LoRA-RITE.

The global batch is the same at every GPU count (strong scaling: each rank gets ``batch / N`` sequences of
every micro-batch), so the speed-up is ``s/step(1 GPU) / s/step(N GPUs)``. Every configuration is one
``lorite finetune`` run on ``social_iqa`` (LoRA r = 16 on all linear layers, bf16 autocast); s/step is the
run's own median over its steps after the first five (``metrics.json``), so model loading and the
evaluation at the end are excluded. Runs are sequential, each alone on the GPUs it uses.

* ``smollm2``: the real SmolLM2-135M-Instruct (``lorite.models``); global batch 32 × 512 tokens.
* ``gemma2b``: random-init ``GemmaForCausalLM`` with Gemma-2B's shape (18 layers, hidden 2048, FFN 16384,
  8 × 256 heads, 1 KV head, vocab 256,000; 2.5B parameters), saved once in bf16 with SmolLM2's tokenizer
  (its ids are < 49,152, inside Gemma's vocabulary); global batch 8 × 512 with gradient checkpointing. The
  loss is meaningless; only time and memory are measured.

    python benchmarks/speed/multigpu_finetune.py --out runs/multigpu --gpus 1,2,4        # GPU machine, ~15 min
    python benchmarks/speed/multigpu_finetune.py --out /tmp/mg --quick                    # CPU: tiny model, gloo, 1-2 procs

Writes ``--out``/``results.json`` and ``results.md`` (rewritten after every run) and each run's directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import REPO, markdown_table, quick_model, quick_task, read_json, write_json

from lorite.cache import atomic_write_text
from lorite.models import resolve_model_dir

GEMMA_2B = dict(
    num_hidden_layers=18, hidden_size=2048, intermediate_size=16384, num_attention_heads=8, head_dim=256,
    num_key_value_heads=1, vocab_size=256000, max_position_embeddings=8192,
)  # fmt: skip
SETTINGS = {  # per model: global batch, sequence length, learning rates, extra finetune flags
    "smollm2": {"batch": 32, "max_length": 512, "flags": []},
    "gemma2b": {"batch": 8, "max_length": 512, "flags": ["--gradient-checkpointing"]},
    "tiny": {"batch": 4, "max_length": 64, "flags": []},
}
LRS = {"adamw": "1e-3", "lora_rite": "1e-2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gemma_model_dir(folder: Path) -> Path:
    """The Gemma-2B-shaped random model, saved once (bf16, ~5 GB) with SmolLM2's tokenizer."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM  # heavy: only for the Gemma shape

    smol = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(smol)
    torch.manual_seed(0)
    config = GemmaConfig(
        **GEMMA_2B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    GemmaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def model_path(name: str, out: Path) -> str | None:
    if name == "smollm2":
        return None  # the default model
    if name == "gemma2b":
        return str(gemma_model_dir(out / "models" / "gemma2b_shape"))
    return str(quick_model(out / "models" / "tiny"))


def run_one(
    model: str, model_spec: str | None, engine: str, optimizer: str, gpus: int, out: Path, args
) -> dict:
    settings = SETTINGS[model]
    run_dir = out / "runs" / f"{model}_{optimizer}_{engine}_{gpus}"
    metrics = read_json(run_dir / "metrics.json")
    if metrics is not None:
        return metrics
    shutil.rmtree(run_dir, ignore_errors=True)
    task = ["--task", args.task]
    finetune = [
        "finetune", *task, "--optimizer", optimizer, "--lr", LRS[optimizer], "--rank", "16",
        "--steps", str(args.steps), "--batch-size", str(settings["batch"]), "--max-length",
        str(settings["max_length"]), "--n-validation", "8", "--n-test", "8", "--eval-batch-size", "8",
        "--target-modules", "all-linear", "--device", "cpu" if args.quick else "cuda", "--out", str(run_dir),
        *settings["flags"],
    ]  # fmt: skip
    if model_spec is not None:
        finetune += ["--model", model_spec]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    # the children import lorite from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    if args.quick:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    if gpus == 1:
        command = [sys.executable, "-m", "lorite.cli", *finetune]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
            f"--master-port={_free_port()}", "-m", "lorite.cli", *finetune, "--parallel", engine,
        ]  # fmt: skip
    began = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        return {"failed": result.stderr.strip().splitlines()[-1][:300] if result.stderr.strip() else "failed"}
    metrics = read_json(run_dir / "metrics.json")
    metrics["wall_seconds"] = time.time() - began
    return metrics


def table(results: dict) -> str:
    header = ["model", "optimizer", "engine", "GPUs", "s/step", "examples/s", "speed-up vs 1 GPU", "note"]
    rows = []
    for key, row in results.items():
        model, optimizer, engine, gpus = key.split("|")
        if "failed" in row:
            rows.append([model, optimizer, engine, gpus, "–", "–", "–", f"failed: {row['failed']}"])
            continue
        one = results.get(f"{model}|{optimizer}|{engine}|1") or {}
        speedup = (
            f"{one['seconds_per_step'] / row['seconds_per_step']:.2f}×"
            if one.get("seconds_per_step")
            else "–"
        )
        batch = SETTINGS[model]["batch"]
        seconds = row["seconds_per_step"]
        rows.append([model, optimizer, engine, gpus, f"{seconds:.3f}", f"{batch / seconds:.1f}", speedup, ""])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", default="1,2,4", help="comma list of GPU counts")
    parser.add_argument("--models", default="smollm2,gemma2b")
    parser.add_argument("--engines", default="ddp,fsdp2")
    parser.add_argument("--optimizers", default="adamw,lora_rite")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--quick", action="store_true", help="CPU smoke test: tiny model, gloo, 1-2 processes"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    models = [m for m in args.models.split(",") if m.strip()]
    args.task = "social_iqa"
    if args.quick:
        gpus, models, args.steps = [1, 2], ["tiny"], 8
        args.task = quick_task(out / "task" / "task.json", n=120)
    else:
        available = torch.cuda.device_count()
        if max(gpus) > available:
            raise SystemExit(
                f"multigpu_finetune: --gpus asks for {max(gpus)} GPUs, this machine has {available}"
            )
    unknown = set(models) - set(SETTINGS)
    if unknown:
        raise SystemExit(
            f"multigpu_finetune: unknown model(s) {sorted(unknown)}; choose from smollm2, gemma2b"
        )
    results: dict[str, dict] = {}
    for model in models:
        spec = model_path(model, out)
        for optimizer in args.optimizers.split(","):
            for engine in args.engines.split(","):
                for count in gpus:
                    if count == 1 and engine != args.engines.split(",")[0]:
                        results[f"{model}|{optimizer}|{engine}|1"] = results[
                            f"{model}|{optimizer}|{args.engines.split(',')[0]}|1"
                        ]  # one GPU has no engine: the same run
                        continue
                    row = run_one(model, spec, engine, optimizer, count, out, args)
                    keep = (
                        "seconds_per_step",
                        "world_size",
                        "wall_seconds",
                        "failed",
                        "trainable_parameters",
                    )
                    results[f"{model}|{optimizer}|{engine}|{count}"] = {k: row[k] for k in keep if k in row}
                    print(
                        f"{model} {optimizer} {engine} {count}: {results[f'{model}|{optimizer}|{engine}|{count}']}"
                    )
                    write_json(out / "results.json", results)
                    atomic_write_text(out / "results.md", table(results))
    medians = [r["seconds_per_step"] for r in results.values() if r.get("seconds_per_step")]
    print(table(results))
    print(f"median s/step over all runs: {statistics.median(medians):.3f}" if medians else "no finished runs")


if __name__ == "__main__":
    main()
