"""CUDA check behind benchmarks/RESULTS.md (2026-12-03): LoRARite with a device-tensor lr and with
``cuda_graph=True`` against eager float-lr steps (a schedule changes the lr), and an eager twin rebuilt
through ``load_state_dict``. Prints the largest parameter difference of each.

    python3 benchmarks/speed/graph_check.py          # from the repository root, on a GPU
"""

import copy
import sys

import torch

sys.path[:0] = ["src", "tests", "tests/optim"]
from helpers import batches, lm_step, tiny_peft  # noqa: E402 (after the path set-up)
from lorite.optim import LoRARite, find_lora_pairs  # noqa: E402


def run(mode):
    model = tiny_peft(r=4).cuda()
    lr = torch.tensor(1e-2, device="cuda")
    opt = LoRARite.from_model(
        model, lr=lr if mode != "eager-float" else 1e-2, cuda_graph=(mode == "internal")
    )
    data = [ids.cuda() for ids in batches(8)]
    for i, ids in enumerate(data):
        rate = 1e-2 * (0.5 ** max(0, i - 3))
        if isinstance(opt.param_groups[0]["lr"], torch.Tensor):
            lr.fill_(rate)
        else:
            for g in opt.param_groups:
                g["lr"] = rate
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return torch.cat(
        [p.detach().flatten() for pair in find_lora_pairs(model).pairs for p in (pair.A, pair.B)]
    )


ref = run("eager-float")
for mode in ("eager-tensor", "internal"):
    out = run(mode)
    print(mode, "max abs diff vs eager float lr:", (out - ref).abs().max().item(), flush=True)
# twin through load_state_dict, eager both
model = tiny_peft(r=4).cuda()
opt = LoRARite.from_model(model, lr=1e-2)
data = [ids.cuda() for ids in batches(8)]
for ids in data[:3]:
    lm_step(model, opt, ids)
twin_model = copy.deepcopy(model)
twin = LoRARite.from_model(twin_model, lr=1e-2)
twin.load_state_dict(opt.state_dict())
for ids in data[3:]:
    lm_step(model, opt, ids)
    lm_step(twin_model, twin, ids)
a = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
b = torch.cat([p.detach().flatten() for p in twin_model.parameters() if p.requires_grad])
print("eager twin after load_state_dict: max abs diff", (a - b).abs().max().item())
