"""Timing and host-sync behaviour of the batched linear-algebra primitives a LoRA-pair optimizer can use,
on the Gemma-2B LoRA shapes (r=16). Informs lorite.optim._linalg's choices on GPU.

    python benchmarks/speed/linalg_primitives.py
    python benchmarks/speed/linalg_primitives.py --eigh-ranks 4,8,16,32,64   # eigh cost against the rank
    python benchmarks/speed/linalg_primitives.py --jacobi-warps 16,32,64      # the Jacobi kernel's num_warps
    python benchmarks/speed/linalg_primitives.py --host-threads 32,64         # host LAPACK by thread count
    python benchmarks/speed/linalg_primitives.py --jacobi-methods 32,64,128,256  # two- vs one-sided, cold/warm
    TRITON_INTERPRET=1 python benchmarks/speed/linalg_primitives.py --jacobi-methods 48 --matrices 2  # CPU check
"""

from __future__ import annotations

import argparse
import statistics

import torch
from optimizer_step import call_ms, timed  # (it puts the harness and src/ on sys.path)

from lorite.optim import _jacobi


def syncs(fn) -> str:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no sync"
    except RuntimeError as error:
        return "SYNCS: " + str(error).splitlines()[0][:60]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    dev = torch.device("cuda")
    r = 16
    tall = {rows: torch.randn(n, rows, r, device=dev) for rows, n in ((2048, 162), (16384, 54), (256, 36))}
    small = torch.randn(252, r, r, device=dev)
    spd = small @ small.mT + 1e-3 * torch.eye(r, device=dev)
    upper = (
        torch.linalg.qr(tall[2048][:126])[1] if False else torch.triu(small) + 4 * torch.eye(r, device=dev)
    )
    eye = torch.eye(r, device=dev).expand(252, r, r)
    cases = {
        **{f"qr {tuple(x.shape)}": (lambda x=x: torch.linalg.qr(x)) for x in tall.values()},
        **{
            f"gram+cholesky_ex+trsm {tuple(x.shape)}": (
                lambda x=x: torch.linalg.solve_triangular(
                    torch.linalg.cholesky_ex(x.mT @ x)[0].mT, x, upper=True, left=False
                )
            )
            for x in tall.values()
        },
        "eigh (252,16,16)": lambda: torch.linalg.eigh(spd),
        "eigvalsh (504,16,16)": lambda: torch.linalg.eigvalsh(torch.cat([spd, spd])),
        "pinv (252,16,16)": lambda: torch.linalg.pinv(upper),
        "solve_triangular inverse (252,16,16)": lambda: torch.linalg.solve_triangular(upper, eye, upper=True),
        "cholesky_ex (252,16,16)": lambda: torch.linalg.cholesky_ex(spd),
        "bmm (162,2048,16)x(16,16)": lambda: tall[2048] @ small[:162],
        "bmm gram (162,16,2048)x(2048,16)": lambda: tall[2048].mT @ tall[2048],
        "stack 126 x (16,2048)": lambda: torch.stack([t for t in tall[2048][:126].mT]),
    }
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for name, fn in cases.items():
        print(f"{name:<48} {timed(fn, 20, 5, torch.device('cuda')):8.3f} ms   {syncs(fn)}")
    try:
        import triton

        print("triton", triton.__version__)
    except ImportError:
        print("no triton")


def _psd_stacks(ranks: list[int], matrices: int, header: str):
    """lorite's Jacobi module, and per rank a stack of ``matrices`` random r × r PSD matrices on the GPU
    (420 = SmolLM2-135M's 210 pairs × 2 factors); prints the device line and a table header first."""
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; {matrices} matrices per call")
    print(header + "\n" + "|---" * header.count("|", 1) + "|")
    stacks = {}
    for r in ranks:
        x = torch.randn(matrices, r, r, device="cuda")
        stacks[r] = x @ x.mT / r
    return _jacobi, stacks


def eigh_by_rank(ranks: list[int], matrices: int = 420) -> None:
    """LoRA-RITE's eigendecompositions per step at each rank: lorite's Triton Jacobi kernel, cuSOLVER's
    eigh, and LAPACK on the host (copy there and back included; ``_linalg.eigh_small``'s route for r > 32)."""
    header = (
        f"| r | Triton Jacobi ms | torch.linalg.eigh ms | host LAPACK ms ({torch.get_num_threads()} threads) "
        "| max eigenvalue error vs eigh |"
    )
    jacobi_module, stacks = _psd_stacks(ranks, matrices, header)
    dev = torch.device("cuda")
    for r, spd in stacks.items():
        jacobi = timed(lambda spd=spd: jacobi_module.jacobi_eigh(spd), 20, 3, dev)
        cusolver = timed(lambda spd=spd: torch.linalg.eigh(spd), 20, 3, dev)
        host = timed(lambda spd=spd: [t.to(dev) for t in torch.linalg.eigh(spd.cpu())], 20, 3, dev)
        values = jacobi_module.jacobi_eigh(spd)[0]
        error = (values.sort(-1).values - torch.linalg.eigvalsh(spd)).abs().max().item()
        print(f"| {r} | {jacobi:.3f} | {cusolver:.3f} | {host:.3f} | {error:.1e} |", flush=True)


def jacobi_warps(ranks: list[int], matrices: int = 420) -> None:
    """The Triton Jacobi kernel at each ``num_warps`` (1–8) per rank: time and eigenvalue error vs eigh."""
    jacobi_module, stacks = _psd_stacks(
        ranks, matrices, "| r | num_warps | ms | max eigenvalue error vs eigh |"
    )
    dev = torch.device("cuda")
    for r, spd in stacks.items():
        exact = torch.linalg.eigvalsh(spd)
        for warps in (1, 2, 4, 8):
            ms = timed(lambda spd=spd, w=warps: jacobi_module.jacobi_eigh(spd, num_warps=w), 10, 2, dev)
            values = jacobi_module.jacobi_eigh(spd, num_warps=warps)[0]
            error = (values.sort(-1).values - exact).abs().max().item()
            print(f"| {r} | {warps} | {ms:.3f} | {error:.1e} |", flush=True)


def host_threads(ranks: list[int], matrices: int = 420) -> None:
    """``eigh`` and ``eigvalsh`` of CUDA stacks on the host (``_linalg``'s route for r > 32) at 1–16 CPU
    threads, copies included: does the host route gain from threads?"""
    _, stacks = _psd_stacks(ranks, matrices, "| r | threads | eigh ms | eigvalsh ms |")
    dev = torch.device("cuda")
    for r, spd in stacks.items():
        for threads in (1, 2, 4, 8, 16):
            torch.set_num_threads(threads)
            eigh = timed(lambda spd=spd: [t.to(dev) for t in torch.linalg.eigh(spd.cpu())], 15, 3, dev)
            values = timed(lambda spd=spd: torch.linalg.eigvalsh(spd.cpu()).to(dev), 15, 3, dev)
            print(f"| {r} | {threads} | {eigh:.1f} | {values:.1f} |", flush=True)


def _warm_stack(cold: torch.Tensor, relative_noise: float = 1e-3) -> torch.Tensor:
    """What a warm-started step feeds the solver: ``Eᵀ(V + N)E`` with ``E`` the float64 eigenvectors of
    ``V`` and ``N`` a symmetric noise of ``relative_noise·‖V‖_F`` (the step's change of ``V``)."""
    V = cold.double()
    E = torch.linalg.eigh(V)[1]
    noise = torch.randn_like(V)
    noise = noise + noise.mT
    noise *= relative_noise * V.norm(dim=(1, 2), keepdim=True) / noise.norm(dim=(1, 2), keepdim=True)
    return (E.mT @ (V + noise) @ E).float()


def _timed_calls(fn, device: torch.device, budget_ms: float = 1500.0, steps: int = 10):
    """``fn()``'s result after one untimed call (compilation, warm-up), then the median ms of up to ``steps``
    timed calls, fewer once ``budget_ms`` is spent (the slow cold r = 256 cases get one or two)."""
    result = fn()
    samples: list[float] = []
    while len(samples) < steps and sum(samples) < budget_ms:
        samples.append(call_ms(fn, device))
        if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1): one call shows that it runs
            break
    return result, statistics.median(samples)


def jacobi_methods(ranks: list[int], matrices: int = 420, warps: list[int] | None = None) -> None:
    """Two-sided (scratch) against one-sided (Hestenes) global-memory Jacobi, ``matrices`` per call, on cold
    random PSD matrices (as ``_psd_stacks``) and warm ones (``_warm_stack``: the input in a near-eigenbasis),
    at each ``num_warps``: median ms, mean sweeps done (early exit), and the largest eigenvalue error
    relative to ``‖V‖₂`` against float64 ``torch.linalg.eigh`` of the same fp32 input."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}  torch {torch.__version__}; {matrices} matrices per call; tol = sqrt(n)*eps")
    header = "| r | input | method | num_warps | ms | mean sweeps (cap) | max eigenvalue error / ‖V‖₂ |"
    print(header + "\n" + "|---" * header.count("|", 1) + "|", flush=True)
    generator = torch.Generator().manual_seed(0)
    for r in ranks:
        x = torch.randn(matrices, r, r, generator=generator)
        cold = x @ x.mT / r
        inputs = {"cold": cold, "warm": _warm_stack(cold)}
        n = max(16, 1 << (r - 1).bit_length())
        for label, V in inputs.items():
            exact = torch.linalg.eigvalsh(V.double())
            scale = exact.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
            V = V.to(device)
            for method in _jacobi.METHODS:
                cap = _jacobi._sweeps(n) if method == "two_sided" else _jacobi._one_sided_sweeps(n)
                for w in warps or ((1, 4, 8) if r <= 64 else (4, 8)):
                    done = torch.zeros(matrices, dtype=torch.int32, device=device)

                    def call(V=V, method=method, w=w, done=done):
                        return _jacobi.jacobi_eigh(V, num_warps=w, method=method, sweeps_done=done)

                    (values, _), ms = _timed_calls(call, device)
                    error = ((values.cpu().double().sort(-1).values - exact).abs() / scale).max().item()
                    sweeps = done.float().mean().item()
                    print(
                        f"| {r} | {label} | {method} | {w} | {ms:.3f} | {sweeps:.2f} ({cap}) | {error:.1e} |",
                        flush=True,
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eigh-ranks", default=None, help="comma-separated ranks: time eigh against r only")
    parser.add_argument("--jacobi-warps", default=None, help="comma-separated ranks: the kernel's num_warps")
    parser.add_argument("--host-threads", default=None, help="comma-separated ranks: host eigh by threads")
    parser.add_argument(
        "--jacobi-methods",
        default=None,
        help="comma-separated ranks: one- vs two-sided Jacobi, cold and warm",
    )
    parser.add_argument("--matrices", type=int, default=420, help="matrices per call (--jacobi-methods)")
    parser.add_argument("--warps", default=None, help="comma-separated num_warps (--jacobi-methods)")
    args = parser.parse_args()
    if args.jacobi_methods:
        jacobi_methods(
            [int(r) for r in args.jacobi_methods.split(",")],
            args.matrices,
            [int(w) for w in args.warps.split(",")] if args.warps else None,
        )
    elif args.host_threads:
        host_threads([int(r) for r in args.host_threads.split(",")])
    elif args.jacobi_warps:
        jacobi_warps([int(r) for r in args.jacobi_warps.split(",")])
    elif args.eigh_ranks:
        eigh_by_rank([int(r) for r in args.eigh_ranks.split(",")])
    else:
        main()
