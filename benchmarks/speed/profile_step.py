"""Where one optimizer step spends its time: torch.profiler over a few steps on a benchmark config.

python benchmarks/speed/profile_step.py --config gemma2b --optimizer lora_rite
"""

from __future__ import annotations

import argparse

import torch
from optimizer_step import CONFIGS, build_optimizer, make_pairs, set_grads  # (and src/ on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gemma2b", choices=sorted(CONFIGS))
    parser.add_argument("--optimizer", default="lora_rite")
    parser.add_argument("--rows", type=int, default=22)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.config != "cpu" else "cpu")
    pairs = make_pairs(CONFIGS[args.config], 16, device)
    optimizer = build_optimizer(args.optimizer, pairs, device)
    set_grads(pairs, 1)
    for _ in range(5):
        optimizer.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
