"""torch.compile and lorite's optimizers (issue 24): does a compiled training step break its graph inside
the optimizer, and does the compiled step compute what the eager one does?

For each optimizer (``lorite.optim.create`` names) on a tiny random-init Llama with peft LoRA:

1. ``torch._dynamo.explain`` of ``optimizer.step`` after two eager steps: graphs and graph breaks;
2. ``torch._dynamo.explain`` of a whole training step (forward, ``loss.backward()``, step, ``zero_grad``):
   its breaks, split into those raised inside ``lorite/optim`` and elsewhere (``backward`` itself breaks
   the graph unless compiled autograd is on: that is torch's, not the optimizer's);
3. ``torch.compile(optimizer.step)`` for ``--steps`` steps against an eager twin: the largest parameter
   difference.

    python3 benchmarks/speed/compile_check.py                       # CPU, or CUDA where there is one
    python3 benchmarks/speed/compile_check.py --optimizers lora_rite --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
from harness import command_line, markdown_table, write_json  # noqa: E402

from helpers import batches, tiny_peft  # noqa: E402 (tests/helpers.py: the tiny peft model)
from lorite import optim  # noqa: E402


def _breaks(explanation) -> tuple[int | str, list[str]]:
    """(breaks raised inside lorite/optim, one line per break: reason @ innermost lorite frame). Where
    ``explain`` counts more breaks than it gives reasons for (torch 2.11 does, for a break in a nested
    call), the count inside is ``"?"``: rerun with TORCH_LOGS=graph_breaks to see where they are."""
    if len(explanation.break_reasons) < explanation.graph_break_count:
        return "?", [
            f"{explanation.graph_break_count - len(explanation.break_reasons)} breaks without a reason"
        ]
    inside, lines = 0, []
    for reason in explanation.break_reasons:
        frames = [f for f in reason.user_stack if "lorite/optim" in f.filename.replace("\\", "/")]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside lorite.optim"
        inside += bool(frames)
        lines.append(f"{reason.reason.splitlines()[0][:90]} @ {where}")
    return inside, lines


def check(name: str, device: torch.device, steps: int) -> dict:
    torch._dynamo.reset()
    model = tiny_peft(r=4).to(device)
    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = optim.create(name, model, lr=1e-3), optim.create(name, twin, lr=1e-3)
    data = [ids.to(device) for ids in batches(steps + 3)]

    def forward_backward(net, ids):
        net(input_ids=ids, labels=ids).loss.backward()

    def train_step(ids):
        forward_backward(model, ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for ids in data[:2]:  # the state exists before tracing, as after any first steps
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            forward_backward(net, ids)
            opt.step()
            opt.zero_grad(set_to_none=True)
    forward_backward(model, data[2])
    began = time.perf_counter()
    step_explained = torch._dynamo.explain(optimizer.step)()
    step_inside, step_lines = _breaks(step_explained)
    optimizer.zero_grad(set_to_none=True)
    twin_optimizer.zero_grad(set_to_none=True)
    whole_explained = torch._dynamo.explain(train_step)(data[2])  # explain runs it: one more step
    whole_inside, whole_lines = _breaks(whole_explained)
    for _ in range(2):  # the twin takes the two steps that explain ran
        forward_backward(twin, data[2])
        twin_optimizer.step()
        twin_optimizer.zero_grad(set_to_none=True)
    # compiled step against the eager twin, from the same state
    compiled_step = torch.compile(optimizer.step)
    for ids in data[3:]:
        forward_backward(model, ids)
        compiled_step()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(twin, ids)
        twin_optimizer.step()
        twin_optimizer.zero_grad(set_to_none=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    twin_trained = [p for p in twin.parameters() if p.requires_grad]
    difference = max(float((a - b).abs().max()) for a, b in zip(trained, twin_trained))
    return {
        "optimizer": name,
        "device": str(device),
        "step_graphs": step_explained.graph_count,
        "step_breaks": step_explained.graph_break_count,
        "step_breaks_inside_optimizer": step_inside,
        "step_break_reasons": step_lines,
        "train_step_graphs": whole_explained.graph_count,
        "train_step_breaks": whole_explained.graph_break_count,
        "train_step_breaks_inside_optimizer": whole_inside,
        "train_step_break_reasons": whole_lines,
        "compiled_vs_eager_max_abs_diff": difference,
        "seconds": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="lora_rite,lora_rite_reference,adamw")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="compiled steps compared with eager ones")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for name in args.optimizers.split(","):
        result = check(name, device, args.steps)
        results.append(result)
        for line in result["step_break_reasons"] + result["train_step_break_reasons"]:
            print(f"{name}: {line}", flush=True)
    header = ["optimizer", "step: graphs / breaks (in optimizer)", "train step: graphs / breaks (in optimizer)",
              "compiled vs eager, max |Δθ|"]  # fmt: skip
    rows = [
        [r["optimizer"], f"{r['step_graphs']} / {r['step_breaks']} ({r['step_breaks_inside_optimizer']})",
         f"{r['train_step_graphs']} / {r['train_step_breaks']} ({r['train_step_breaks_inside_optimizer']})",
         f"{r['compiled_vs_eager_max_abs_diff']:.2e}"]
        for r in results
    ]  # fmt: skip
    print(f"\n{device}, torch {torch.__version__}\n\n" + markdown_table(header, rows), end="")
    if args.json:
        write_json(
            Path(args.json), {"torch": torch.__version__, "command": command_line(), "results": results}
        )


if __name__ == "__main__":
    main()
