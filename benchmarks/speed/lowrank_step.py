"""GaLore / Fira optimizer speed and memory (issue 7), and the quality of the approximate SVD refresh.

1. **Step table** — random gradients on the parameter shapes of GaLore's LLaMA configs (vocab 32,000,
   untied embeddings): ``60m`` (hidden 512, FFN 1376, 8 layers, 8 heads; rank 128) and ``350m`` (hidden
   1024, FFN 2736, 24 layers, 16 heads; rank 256). Every attention/MLP matrix is projected (scale 0.25),
   embeddings and norms get AdamW. For each optimizer: the first step (state + first SVD), then
   two windows of ``update_proj_gap + 1`` timed steps (CUDA events; ``perf_counter`` on CPU), each
   containing exactly one projection refresh whichever way the implementation counts. The first window is
   warm-up (its refresh also pays one-off costs such as solver handles; recorded as
   ``first_window_refresh_ms``); from the second: *steady* = the median, *refresh* = the maximum.
   *State* = bytes of every tensor in the optimizer state (projector objects included); *peak* = the most
   extra CUDA memory the timed steps allocated beyond the state (the SVD's workspace).
   Rows: torch's fused AdamW; lorite ``galore_adamw`` / ``fira_adamw`` with the default ``svd="subspace"``
   and with ``svd="exact"``; pytorch_optimizer's ``GaLore`` / ``Fira``, galore-torch's ``GaLoreAdamW`` and
   fira's ``FiraAdamW`` when importable.
2. **Quality of the approximate refresh** — a byte-level LLaMA (the ``--quality-size`` shapes, vocab 256)
   trained on the Python standard library's source (found on any machine; 95 %/5 % train/held-out split
   by file) with lorite GaLore and Fira, once with ``svd="exact"`` and once with ``svd="subspace"``, same
   init and batches. At every refresh of the subspace runs the gradients are checked: the energy
   ``‖PᵀG‖²/‖G‖²`` captured by the warm-started subspace iteration (1 and 2 iterations), by
   ``torch.svd_lowrank`` and by the stale basis (no refresh), relative to the exact top-r energy. Reported
   with the held-out loss (nats per byte) and perplexity of the four runs.

    python benchmarks/speed/lowrank_step.py --out lowrank.json                   # GPU: both sizes + quality
    python benchmarks/speed/lowrank_step.py --quick --out /tmp/lowrank.json      # CPU smoke test (tiny shapes)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # optimizer_step, next to this file
from optimizer_step import call_ms

from lorite.optim import FiraAdamW, GaLoreAdamW, create
from lorite.optim._lowrank import LowRankProjector

SIZES = {  # GaLore's configs/llama_{60m,350m}.json; rank as the benchmark scripts
    "60m": dict(hidden=512, ffn=1376, layers=8, heads=8, vocab=32000, rank=128),
    "350m": dict(hidden=1024, ffn=2736, layers=24, heads=16, vocab=32000, rank=256),
}
QUICK_SIZES = {  # --quick: the same structure, tiny
    "60m": dict(hidden=64, ffn=172, layers=2, heads=4, vocab=1000, rank=16),
    "350m": dict(hidden=96, ffn=256, layers=3, heads=4, vocab=1000, rank=24),
}
LR, SCALE = 0.01, 0.25
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------- step table
def parameter_shapes(cfg: dict) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(projected attn/MLP weight shapes, AdamW shapes) of a LLaMA config, as nn.Linear stores them."""
    h, f = cfg["hidden"], cfg["ffn"]
    per_layer = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                 "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}  # fmt: skip
    projected = [per_layer[name] for _ in range(cfg["layers"]) for name in LINEARS]
    rest = [(cfg["vocab"], h), (cfg["vocab"], h), (h,)] + [(h,)] * (2 * cfg["layers"])
    return projected, rest


def make_params(cfg: dict, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    projected_shapes, rest_shapes = parameter_shapes(cfg)

    def make(shape):
        p = (0.02 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
        p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(device)
        return p

    return [make(s) for s in projected_shapes], [make(s) for s in rest_shapes]


def build_optimizer(name: str, projected, rest, rank: int, gap: int, device: torch.device):
    """Returns the optimizer, or None when its package is not importable."""
    if name == "adamw (torch)":
        kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(projected + rest, lr=LR, weight_decay=0.0, **kind)
    if name.startswith("lorite"):
        svd = name.split("svd=")[1].rstrip(")")
        cls, key = (FiraAdamW, "alpha") if "fira" in name else (GaLoreAdamW, "scale")
        group = {"params": projected, "rank": rank, "update_proj_gap": gap, key: SCALE, "svd": svd}
        return cls([group, {"params": rest}], lr=LR)
    try:
        if name == "pytorch_optimizer.GaLore":
            from pytorch_optimizer import GaLore as cls
        elif name == "pytorch_optimizer.Fira":
            from pytorch_optimizer import Fira as cls
        elif name == "galore_torch.GaLoreAdamW":
            from galore_torch import GaLoreAdamW as cls
        elif name == "fira.FiraAdamW":
            from fira import FiraAdamW as cls
        else:
            raise ValueError(name)
    except Exception:  # not installed, or galore-torch's bitsandbytes import failing
        return None
    group = {"params": projected, "rank": rank, "update_proj_gap": gap}
    if name.startswith("pytorch_optimizer"):
        group.update(scale=SCALE, projection_type="std")
    elif name == "fira.FiraAdamW":
        group.update(alpha=SCALE, proj_type="std")
    else:
        group.update(scale=SCALE, proj_type="std")
    return cls([group, {"params": rest}], lr=LR)


def state_bytes(optimizer) -> int:
    """Bytes of every distinct tensor reachable from the optimizer state (projector objects included)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value, depth=0):
        nonlocal total
        if depth > 4:
            return
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.numel())
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                visit(v, depth + 1)

    for state in optimizer.state.values():
        visit(state)
    return total


def measure(name: str, cfg: dict, gap: int, device: torch.device) -> dict | None:
    projected, rest = make_params(cfg, device)
    optimizer = build_optimizer(name, projected, rest, cfg["rank"], gap, device)
    if optimizer is None:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_ms = call_ms(optimizer.step, device)
    state = state_bytes(optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    # two windows of gap + 1 steps, each with one refresh: the first refresh after the first step also pays
    # one-off costs (solver handles, kernel loading), so the table reports the second window's
    warmup = [call_ms(optimizer.step, device) for _ in range(gap + 1)]
    samples = [call_ms(optimizer.step, device) for _ in range(gap + 1)]
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    has_refresh = name != "adamw (torch)"
    row = {
        "optimizer": name,
        "steady_ms": statistics.median(samples),
        "refresh_ms": max(samples) if has_refresh else None,
        "first_window_refresh_ms": max(warmup) if has_refresh else None,
        "first_step_ms": first_ms,
        "state_mb": state / 2**20,
        "peak_extra_mb": peak,
    }
    del optimizer, projected, rest
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


OPTIMIZERS = [
    "adamw (torch)",
    "lorite galore_adamw (svd=subspace)",
    "lorite galore_adamw (svd=exact)",
    "lorite fira_adamw (svd=subspace)",
    "lorite fira_adamw (svd=exact)",
    "pytorch_optimizer.GaLore",
    "pytorch_optimizer.Fira",
    "galore_torch.GaLoreAdamW",
    "fira.FiraAdamW",
]


def step_table(size: str, cfg: dict, gap: int, device: torch.device, flush) -> list[dict]:
    rows: list[dict] = []
    for name in OPTIMIZERS:
        row = measure(name, cfg, gap, device)
        if row is None:
            print(f"  {name}: not importable, skipped", flush=True)
            continue
        row["size"] = size
        rows.append(row)
        flush(row)
        print(f"  {name}: steady {row['steady_ms']:.3f} ms, refresh {row['refresh_ms']} ms", flush=True)
    adamw = next((r["steady_ms"] for r in rows if r["optimizer"] == "adamw (torch)"), None)
    for row in rows:
        row["x_adamw"] = row["steady_ms"] / adamw if adamw else None
    return rows


def print_step_table(rows: list[dict]) -> None:
    print("\n| size | optimizer | steady step ms | × AdamW | refresh step ms | first step ms | state MB | peak "
          "extra MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        refresh = f"{r['refresh_ms']:.1f}" if r["refresh_ms"] is not None else "—"
        peak = f"{r['peak_extra_mb']:.0f}" if r["peak_extra_mb"] is not None else "—"
        print(
            f"| {r['size']} | {r['optimizer']} | {r['steady_ms']:.3f} | {r['x_adamw']:.2f}× | {refresh} | "
            f"{r['first_step_ms']:.1f} | {r['state_mb']:.0f} | {peak} |"
        )


# ---------------------------------------------------------------------- quality of the approximate SVD
def stdlib_bytes(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) uint8 byte streams of the standard library's .py files (sorted; every 20th file
    held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    train, held_out, total = bytearray(), bytearray(), 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (held_out if i % 20 == 0 else train).extend(data)
        total += len(data)
        if total >= limit:
            break
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(held_out)


def batch_at(stream: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq].long() for s in starts.tolist()])


def byte_llama(cfg: dict, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device)


def energy_checks(optimizer, rank: int) -> list[dict]:
    """Captured-energy ratios at a refresh step, for every projected parameter (before optimizer.step())."""
    rows = []
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is None or not state:
                continue
            G = p.grad.float()[None]
            total = G.square().sum()
            top = torch.linalg.svdvals(G[0]).square()[: min(rank, *G.shape[1:])].sum()
            stale = {"proj": state["proj"].float()[None].clone()}

            projector = LowRankProjector(tuple(p.shape), rank)
            row = {"stale": float(projector.project(G, stale).square().sum() / top)}
            for label, method, iters in (("subspace1", "subspace", 1), ("subspace2", "subspace", 2),
                                         ("lowrank", "lowrank", 2)):  # fmt: skip
                projector = LowRankProjector(tuple(p.shape), rank, svd=method, svd_iters=iters)
                bases = {"proj": stale["proj"].clone()}
                projector.refresh(G, bases, first=False, seed=0)
                row[label] = float(projector.project(G, bases).square().sum() / top)
            row["exact_fraction_of_total"] = float(top / total)
            rows.append(row)
    return rows


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10 % (the papers' schedule)."""
    progress = min(1.0, max(0, step - warmup) / max(1, steps - warmup))
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def quality_check(cfg: dict, steps: int, gap: int, batch: int, seq: int, device: torch.device, flush) -> dict:
    train, held_out = stdlib_bytes(limit=30_000_000)
    print(
        f"quality: {len(train) / 1e6:.1f} MB train / {len(held_out) / 1e6:.1f} MB held-out bytes", flush=True
    )
    warmup = max(1, steps // 10)
    runs, checks = {}, {}
    use_bf16 = device.type == "cuda"
    for name in ("galore_adamw", "fira_adamw"):
        for svd in ("exact", "subspace"):
            label = f"{name} svd={svd}"
            model = byte_llama(cfg, device)
            optimizer = create(
                name, model, lr=LR, rank=cfg["rank"], update_proj_gap=gap, scale=SCALE, svd=svd
            )
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
            found, began = [], time.perf_counter()
            for step in range(steps):
                ids = batch_at(train, step, batch, seq, seed=1).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if svd == "subspace" and step > 0 and step % gap == 0:
                    found.extend(energy_checks(optimizer, cfg["rank"]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            model.eval()
            losses = []
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                for i in range(8):
                    ids = batch_at(held_out, i, batch, seq, seed=2).to(device)
                    losses.append(float(model(input_ids=ids, labels=ids).loss))
            held = statistics.mean(losses)
            runs[label] = {"held_out_loss": held, "held_out_ppl": math.exp(held), "train_loss_last": float(loss.detach()),
                           "seconds": time.perf_counter() - began}  # fmt: skip
            if found:
                checks[name] = {
                    key: {"mean": statistics.mean(r[key] for r in found), "min": min(r[key] for r in found)}
                    for key in found[0]
                } | {"n_matrices_x_refreshes": len(found)}
            flush({"runs": runs, "energy": checks})
            print(
                f"  {label}: held-out loss {held:.4f} nats/byte ({runs[label]['seconds']:.0f} s)", flush=True
            )
            del model, optimizer
    return {"runs": runs, "energy": checks, "steps": steps, "gap": gap, "batch": batch, "seq": seq, **cfg}


def print_quality(q: dict) -> None:
    print(f"\nQuality (byte-level LLaMA hidden {q['hidden']}, {q['layers']} layers, rank {q['rank']}; "
          f"{q['steps']} steps of {q['batch']}×{q['seq']} bytes, gap {q['gap']})")  # fmt: skip
    print("\n| run | held-out loss (nats/byte) | held-out ppl (per byte) |")
    print("|---|---|---|")
    for label, r in q["runs"].items():
        print(f"| {label} | {r['held_out_loss']:.4f} | {r['held_out_ppl']:.3f} |")
    print("\n| optimizer (svd=subspace run) | basis | captured energy / exact top-r: mean | min |")
    print("|---|---|---|---|")
    names = {"subspace1": "subspace, 1 iteration", "subspace2": "subspace, 2 iterations (default)",
             "lowrank": "torch.svd_lowrank, niter 2", "stale": "previous basis (no refresh)"}  # fmt: skip
    for optimizer, stats in q["energy"].items():
        for key, label in names.items():
            print(f"| {optimizer} | {label} | {stats[key]['mean']:.4f} | {stats[key]['min']:.4f} |")
        share = stats["exact_fraction_of_total"]["mean"]
        print(f"| {optimizer} | (exact top-r energy / total, mean) | {share:.4f} | |")


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="60m,350m")
    parser.add_argument("--gap", type=int, default=None, help="update_proj_gap (default 200; --quick 5)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (CPU smoke test)")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--quality-size", default="60m")
    parser.add_argument("--quality-steps", type=int, default=None, help="default 800 (--quick 12)")
    parser.add_argument("--quality-gap", type=int, default=None, help="default 100 (--quick 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="results JSON (rewritten after every row)")
    args = parser.parse_args(argv)

    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    sizes = QUICK_SIZES if args.quick else SIZES
    gap = args.gap or (5 if args.quick else 200)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "gap": gap, "quick": args.quick, "steps": [], "quality": None,
        "command": " ".join(sys.argv),
    }  # fmt: skip

    def write() -> None:
        if args.out:
            write_json(Path(args.out), results)

    def add_row(row: dict) -> None:
        results["steps"].append(row)
        write()

    for size in args.sizes.split(","):
        print(f"== {size} on {results['device']}: {sizes[size]}, update_proj_gap {gap}", flush=True)
        step_table(size, sizes[size], gap, device, add_row)
    print_step_table(results["steps"])

    if not args.no_quality:
        cfg = sizes[args.quality_size]
        steps = args.quality_steps or (12 if args.quick else 800)
        qgap = args.quality_gap or (4 if args.quick else 100)
        batch, seq = (4, 64) if args.quick else (32, 256)

        def flush_quality(partial: dict) -> None:
            results["quality"] = partial
            write()

        results["quality"] = quality_check(cfg, steps, qgap, batch, seq, device, flush_quality)
        write()
        print_quality(results["quality"])


if __name__ == "__main__":
    main()
