"""``lorite federate``: FedEP, FedSEP, FedAvg or FedPA on a non-IID split of digits or a BIG-bench
classification task, in process or on Flower, with progress per round, an accuracy curve and resume."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import LoriteError
from ..federated.data import DataSpec
from ..federated.runner import run as run_federated
from ..federated.server import RunSpec, open_run
from ..runtime import require_new_output
from ..tasks import check_task_specs

ALGOS = ("fedep", "fedsep", "fedavg", "fedpa")


def _alpha(text: str) -> float:
    if text.lower() in ("inf", "iid"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha must be a number or 'iid', got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "federate",
        help="federated learning (FedEP/FedSEP/FedAvg/FedPA) on a non-IID split; in process or Flower",
    )
    p.add_argument("--algo", default="fedep", help=f"one of {', '.join(ALGOS)} (fedsep: stateless FedEP)")
    p.add_argument(
        "--data",
        default="digits",
        help="digits, or a BIG-bench classification task (e.g. multiemo/products_sentence_en)",
    )
    p.add_argument("--clients", type=int, default=20, help="number of clients M")
    p.add_argument("--clients-per-round", type=int, default=5, help="clients sampled per round K")
    p.add_argument(
        "--rounds", type=int, default=None, help="total rounds (default 50; with --resume: raise the total)"
    )
    p.add_argument(
        "--alpha", type=_alpha, default=0.1, help="Dirichlet concentration of the label split ('iid': IID)"
    )
    p.add_argument(
        "--engine",
        default="inprocess",
        help="inprocess (default), flower-sim or flower (localhost processes)",
    )
    p.add_argument("--out", default=None, help="new run directory")
    p.add_argument("--resume", default=None, help="continue the run in this directory")
    p.add_argument("--seed", type=int, default=0, help="data split, client sampling and initialisation")
    p.add_argument("--model", default="mlp", help="mlp (default), linear, or cnn (digits)")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the mlp model")
    p.add_argument("--local-epochs", type=int, default=5, help="local epochs (= FedEP/FedPA samples)")
    p.add_argument("--batch-size", type=int, default=20, help="client mini-batch size")
    p.add_argument("--lr", type=float, default=0.05, help="client SGD learning rate")
    p.add_argument("--local-momentum", type=float, default=0.9, help="client SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="prior precision per example (wd)")
    p.add_argument("--server-optimizer", default="sgd", help="sgd, adagrad or adam on the server statistics")
    p.add_argument("--server-lr", type=float, default=1.0, help="server optimizer learning rate")
    p.add_argument("--server-momentum", type=float, default=0.0, help="server SGD momentum")
    p.add_argument("--estimator", default="identity", help="FedEP local precision: identity, laplace or mcmc")
    p.add_argument("--scale", type=float, default=1.0, help="FedEP confidence scale of the local precision")
    p.add_argument("--damping", type=float, default=None, help="FedEP damping δ (default 1/K)")
    p.add_argument(
        "--warm-start", default=None, help="start from the final model of this run directory (e.g. FedAvg)"
    )
    p.add_argument(
        "--dropout", type=float, default=0.0, help="simulated client drop-out probability per round"
    )
    p.add_argument(
        "--algo-args", default="{}", help="more algorithm settings as JSON, e.g. '{\"max_delta_norm\": 100}'"
    )
    p.set_defaults(func=run)


def build_spec(args: argparse.Namespace):
    """The :class:`~lorite.federated.server.RunSpec` that the arguments describe."""
    if args.algo not in ALGOS:
        raise LoriteError(f"unknown --algo {args.algo!r}; available: {', '.join(ALGOS)}")
    try:
        extra = json.loads(args.algo_args)
    except json.JSONDecodeError as error:
        raise LoriteError(f"--algo-args is not JSON: {error}") from error
    if not isinstance(extra, dict):
        raise LoriteError("--algo-args must be a JSON object")
    algorithm = "fedep" if args.algo == "fedsep" else args.algo
    config: dict = {
        "clients_per_round": args.clients_per_round,
        "local": {
            "epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "momentum": args.local_momentum,
            "weight_decay": args.weight_decay,
        },
        "server": {"name": args.server_optimizer, "lr": args.server_lr, "momentum": args.server_momentum},
    }
    if algorithm == "fedep":
        config.update(estimator=args.estimator, scale=args.scale, damping=args.damping)
        config["mode"] = "sep" if args.algo == "fedsep" else "ep"
    elif args.estimator != "identity" or args.scale != 1.0 or args.damping is not None:
        raise LoriteError("--estimator, --scale and --damping are FedEP settings")
    config.update(extra)
    data = DataSpec(
        name=args.data,
        clients=args.clients,
        alpha=args.alpha,
        seed=args.seed,
        model=args.model,
        hidden=args.hidden,
    )
    return RunSpec(
        algorithm=algorithm,
        algorithm_config=config,
        data=data,
        rounds=50 if args.rounds is None else args.rounds,
        seed=args.seed,
        engine=args.engine,
        warm_start_from=args.warm_start,
        simulated_dropout=args.dropout,
    )


def run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        if args.out is not None:
            raise LoriteError("give either --out (a new run) or --resume (an existing one), not both")
        out = Path(args.resume)
        spec = open_run(out, args.rounds)
        print(
            f"lorite federate: resuming {out} ({spec.algorithm} on {spec.data.name}, {spec.rounds} rounds)",
            flush=True,
        )
        result = run_federated(spec, out, resume=True, progress=lambda line: print(line, flush=True))
    else:
        if args.out is None:
            raise LoriteError("--out is required (or --resume DIR)")
        spec = build_spec(args)
        spec.make_algorithm()  # K ≤ M
        if spec.data.name != "digits":
            check_task_specs([spec.data.bigbench_task])  # unknown names fail here with a suggestion
        out = Path(args.out)
        require_new_output(out)
        print(
            f"lorite federate: {args.algo} on {spec.data.name}, {spec.data.clients} clients "
            f"(K={spec.make_config().clients_per_round}, α={spec.data.alpha}), {spec.rounds} rounds, engine {spec.engine}",
            flush=True,
        )
        result = run_federated(spec, out, progress=lambda line: print(line, flush=True))
    print(
        f"final test accuracy {result['accuracy']:.4f} (nll {result['nll']:.4f}) after {result['round']} rounds"
    )
    print(
        f"metrics: {out / 'metrics.json'}   curve: {out / 'accuracy.png'}   checkpoint: {out / 'checkpoint.pt'}"
    )
