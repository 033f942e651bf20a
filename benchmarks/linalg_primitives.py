"""Timing and host-sync behaviour of the batched linear-algebra primitives a LoRA-pair optimizer can use,
on the Gemma-2B LoRA shapes (r=16). Informs lorite.optim._linalg's choices on GPU.

    cd benchmarks && python linalg_primitives.py
"""

from __future__ import annotations

import torch
from optimizer_step import timed


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


if __name__ == "__main__":
    main()
