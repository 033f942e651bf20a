"""``lorite analyze spectrum|forgetting``: the command line of :mod:`lorite.analysis.spectrum` (the rank of
each ΔW) and :mod:`lorite.analysis.forgetting` (learning vs forgetting). An output directory that already
holds a result is refused."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.forgetting import (
    DEFAULT_COMMONSENSE,
    ForgettingConfig,
    analyze_forgetting,
    forgetting_markdown,
    write_forgetting_report,
)
from ..analysis.spectrum import analyze_spectrum, spectrum_markdown, write_spectrum_report
from ..errors import LoriteError


def _refuse_existing(out: Path, name: str) -> None:
    if (out / name).exists():
        raise LoriteError(f"--out {str(out)!r} already holds {name}; use another --out")


def cmd_spectrum(args: argparse.Namespace) -> None:
    out = Path(args.out)
    _refuse_existing(out, "spectrum.json")
    result = analyze_spectrum(
        base=args.base, tuned=args.tuned, adapter=args.adapter, threshold=args.threshold,
        criterion=args.criterion, seed=args.seed, device=args.device,
    )  # fmt: skip
    paths = write_spectrum_report(result, out)
    print(spectrum_markdown(result).split("\n\nΔW rank per layer")[0])
    print(f"\n{', '.join(str(p) for p in paths.values())}")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def cmd_forgetting(args: argparse.Namespace) -> None:
    runs = _split(args.runs)
    if not runs:
        raise LoriteError(
            "--runs is empty: give run directories (or snapshot/adapter/model dirs), comma-separated"
        )
    out = Path(args.out)
    _refuse_existing(out, "forgetting.json")
    config = ForgettingConfig(
        prose=args.prose, prose_split=args.prose_split, prose_blocks=args.prose_blocks,
        block_length=args.block_length, commonsense=_split(args.commonsense), n_examples=args.n_examples,
        target=not args.no_target, target_split=args.target_split, batch_size=args.batch_size,
        device=args.device,
    )  # fmt: skip
    result = analyze_forgetting(runs, config, base=args.base)
    paths = write_forgetting_report(result, out)
    print(forgetting_markdown(result))
    print(", ".join(str(p) for p in paths.values()))


def add_parser(sub) -> None:
    """``analyze`` with its two subcommands, on the ``lorite`` subparsers ``sub``."""
    analyze = sub.add_parser("analyze", help="spectrum of ΔW; learning vs forgetting (arXiv 2405.09673)")
    kinds = analyze.add_subparsers(dest="analysis", required=True)

    spectrum = kinds.add_parser("spectrum", help="per matrix: rank of ΔW for 90%% of its variance vs random")
    spectrum.add_argument(
        "--base", default=None, help="the model fine-tuned from (default SmolLM2-135M-Instruct)"
    )
    spectrum.add_argument("--tuned", default=None, help="a fully fine-tuned model dir (or its run dir)")
    spectrum.add_argument(
        "--adapter", default=None, help="a peft LoRA adapter dir (or its run dir): ΔW = s·B·A"
    )
    spectrum.add_argument("--threshold", type=float, default=0.9, help="share of the variance")
    spectrum.add_argument("--criterion", default="var", help="var (σ², the paper's) or sv (σ)")
    spectrum.add_argument("--seed", type=int, default=0, help="the random Gaussian reference")
    spectrum.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, …")
    spectrum.add_argument("--out", default="lorite-spectrum", help="the output directory")
    spectrum.set_defaults(func=cmd_spectrum)

    forgetting = kinds.add_parser("forgetting", help="source-domain metrics across checkpoints; the plot")
    forgetting.add_argument(
        "--runs", required=True, help="comma list of run dirs (or snapshot/adapter/model dirs)"
    )
    forgetting.add_argument("--base", default=None, help="base model (default: each run's own --model)")
    forgetting.add_argument("--prose", default="shakespeare", help="corpus for held-out prose perplexity")
    forgetting.add_argument("--prose-split", default="heldout", help="heldout or all documents")
    forgetting.add_argument("--prose-blocks", type=int, default=64, help="prose blocks evaluated")
    forgetting.add_argument("--block-length", type=int, default=256, help="tokens per prose block")
    forgetting.add_argument(
        "--commonsense", default=",".join(DEFAULT_COMMONSENSE), help="comma list of multiple-choice tasks"
    )
    forgetting.add_argument("--n-examples", type=int, default=300, help="per commonsense task")
    forgetting.add_argument("--no-target", action="store_true", help="skip the runs' own task")
    forgetting.add_argument("--target-split", default="validation", help="validation or test")
    forgetting.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    forgetting.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, …")
    forgetting.add_argument("--out", default="lorite-forgetting", help="the output directory")
    forgetting.set_defaults(func=cmd_forgetting)
