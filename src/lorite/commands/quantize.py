"""``lorite quantize``: LQ-LoRA, ``W ≈ Q + L1·L2`` under a bits-per-parameter budget (the job is
:func:`lorite.train.quantize.run_quantize`); writes the report and the saved model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters.lq_lora import LQLoRAConfig
from ..cache import cache_dir
from ..errors import LoriteError
from ..train.quantize import run_quantize


def add_parser(sub) -> None:
    quant = sub.add_parser(
        "quantize", help="LQ-LoRA: W ≈ Q + L1·L2 under a bits-per-parameter budget; report and saved model"
    )
    quant.add_argument(
        "--model", default=None, help="SmolLM2-135M-Instruct (default), a .gguf file or a model dir"
    )
    quant.add_argument(
        "--budget", type=float, default=3.0, help="bits per parameter of Q (LoRA factors extra)"
    )
    quant.add_argument("--rank", type=int, default=64, help="rank of the LoRA factors L1·L2")
    quant.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scaling 1)")
    quant.add_argument(
        "--init",
        default="lq",
        help="lq (Q + L1·L2) or zero (plain quantization, zero-init LoRA: QLoRA-style)",
    )
    quant.add_argument("--fisher", action="store_true", help="Fisher-weighted decomposition (data-aware)")
    quant.add_argument("--calib", default="corpus:shakespeare", help="Fisher data: a task or corpus:NAME")
    quant.add_argument("--n-calib", type=int, default=64, help="calibration examples (one gradient each)")
    quant.add_argument("--calib-length", type=int, default=256, help="tokens per calibration example")
    quant.add_argument("--grid", default="compact", help="compact (24 formats), full (432) or a comma list")
    quant.add_argument("--max-iter", type=int, default=20, help="decomposition rounds at most")
    quant.add_argument("--rtol", type=float, default=1e-3, help="stop when the error falls less than this")
    quant.add_argument("--solver", default="milp", help="milp (scipy.optimize.milp) or lagrangian")
    quant.add_argument("--target-modules", default="all-linear", help="'all-linear' or a comma list")
    quant.add_argument("--eval-corpus", default="shakespeare", help="held-out documents for perplexity")
    quant.add_argument("--eval-blocks", type=int, default=16, help="perplexity blocks (0: skip)")
    quant.add_argument("--block-length", type=int, default=512, help="tokens per perplexity block")
    quant.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, …")
    quant.add_argument("--cache", default=None, help="cost cache file (default: in lorite's cache dir)")
    quant.add_argument("--no-cache", action="store_true", help="recompute every reconstruction error")
    quant.add_argument("--seed", type=int, default=0, help="calibration sampling and the randomised SVD")
    quant.add_argument("--out", required=True, help="a new directory for the model and report")
    quant.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    try:
        settings = LQLoRAConfig(
            budget=args.budget, rank=args.rank, alpha=args.alpha, init=args.init, target_modules=targets,
            grid=args.grid, max_iter=args.max_iter, rtol=args.rtol, solver=args.solver, seed=args.seed,
        )  # fmt: skip
        settings.validate()
    except ValueError as error:
        raise LoriteError(str(error)) from error
    cache = None if args.no_cache else (args.cache or cache_dir() / "lq_lora" / "costs.json")
    report = run_quantize(
        args.out, settings, args.model, fisher=args.fisher, calib=args.calib, n_calib=args.n_calib,
        calib_length=args.calib_length, eval_corpus=args.eval_corpus, eval_blocks=args.eval_blocks,
        block_length=args.block_length, device=args.device, cache=cache,
    )  # fmt: skip
    ppl = report.get("perplexity") or {}
    summary = (
        f"Q at {report['bits_per_param']:.4f} bits/param, relative error {report['relative_error_total']:.4f}"
    )
    if ppl:
        summary += f", perplexity {ppl['original']:.3f} → {ppl['quantized']:.3f}"
    print(summary)
    print(f"report: {Path(args.out) / 'report.md'}   model: {args.out} (load_lq_lora)")
