"""Flower (``flwr``, Message API) engine for lorite's federated algorithms: a :class:`LoriteStrategy`
(``flwr.serverapp.strategy.Strategy``), a ``ClientApp`` and a ``ServerApp`` that run the same
:class:`~lorite.federated.server.FederatedServer` / :class:`~lorite.federated.server.FederatedClient`
code as the in-process engine, and a launcher that starts and stops Flower for one run.

* ``flower`` (deployment): a SuperLink and one SuperNode per client, separate processes talking HTTP over
  127.0.0.1 (``--node-config partition-id=k``), and ``flwr run`` to submit the app; a client's FedEP site
  lives in its node's ``context.state`` (a per-node record that persists across rounds).
* ``flower-sim``: the SuperLink with ``--simulation`` (Flower's simulation engine, which needs Ray:
  ``pip install "flwr[simulation]"``). Ray's workers listen on all network interfaces and have no
  option to bind to loopback only, so lorite runs this engine inside a private network namespace
  (``unshare --net``; Linux, root or unprivileged user namespaces) whose only interface is loopback.

Messages: the server first sends a ``query`` to every node to learn its ``partition-id`` and shard size
(Flower's node ids are random); then each round it samples clients exactly as the in-process engine does
(seeded by (seed, round)) and sends a ``train`` message to each sampled client's node, carrying the
broadcast as an ``ArrayRecord`` (FedEP: ``eta/<name>``, ``lam/<name>``) and a ``ConfigRecord`` (the round's
scalars and the run spec). Replies carry the client's arrays and ``num-examples``; error replies and
missing replies (time-outs) are drop-outs, excluded and logged like malformed or non-finite replies.
The server state is checkpointed after every round (by the ServerApp, atomically), so a run can resume;
FedEP with stateful sites (``mode="ep"``) cannot resume on Flower, since its sites died with the nodes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import LoriteError
from .core import ClientUpdate, log
from .data import load_federated
from .server import FederatedClient, FederatedServer, RunSpec

FLOWER_PIN = "flwr==1.42.0"

try:  # flwr is optional: the launcher checks for it; the app objects exist only when it is installed
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError:  # pragma: no cover - exercised only without flwr
    Strategy = object  # type: ignore[assignment,misc]
    client_app = server_app = None
    HAVE_FLWR = False
else:
    HAVE_FLWR = True


def _require_flwr() -> None:
    if not HAVE_FLWR:
        raise LoriteError(f"the Flower engines need flwr: pip install '{FLOWER_PIN}' (or 'lorite[all]')")


# ------------------------------------------------------------------------------------------- messages
def _to_tensors(record) -> dict:
    return dict(record.to_torch_state_dict())


def _scalars(record: dict[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class LoriteStrategy(Strategy):
    """A Flower Message-API strategy that drives a :class:`FederatedServer` (any lorite algorithm).

    ``configure_train`` samples the round's clients (seeded, as in process) and addresses their nodes;
    ``aggregate_train`` turns replies into client updates (errors → drop-outs) and lets the server
    validate, aggregate, evaluate and checkpoint. Evaluation is central (the server holds the test set),
    so ``configure_evaluate`` sends nothing."""

    def __init__(self, server: FederatedServer, discovery_timeout: float = 120.0) -> None:
        self.server = server
        self.discovery_timeout = discovery_timeout
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.pending: tuple[int, list[int], float, dict[int, str]] | None = None

    def summary(self) -> None:
        spec = self.server.spec
        log.info(
            "LoriteStrategy: %s, %d clients (%d per round), rounds %d→%d, data %s",
            spec.algorithm, spec.data.clients, self.server.algorithm.clients_per_round,
            self.server.round, spec.rounds, spec.data.name,
        )  # fmt: skip

    def discover(self, grid: Grid) -> None:
        """Map partition ids to node ids with one ``query`` message per node."""
        wanted = self.server.spec.data.clients
        deadline = time.time() + self.discovery_timeout
        nodes = list(grid.get_node_ids())
        while len(nodes) < wanted and time.time() < deadline:
            time.sleep(0.5)
            nodes = list(grid.get_node_ids())
        config = ConfigRecord({"spec": self.server.spec.to_json()})
        messages = [
            Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=node)
            for node in nodes
        ]
        sizes = self.server.task.client_sizes
        for reply in grid.send_and_receive(messages, timeout=self.discovery_timeout):
            if reply.has_error():
                log.warning(
                    "node %d did not answer the discovery query: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            metrics = reply.content["metrics"]
            client, examples = int(metrics["partition-id"]), int(metrics["num-examples"])
            if not 0 <= client < wanted or examples != sizes[client]:
                log.warning(
                    "node %d reports client %d with %d examples: ignored",
                    reply.metadata.src_node_id,
                    client,
                    examples,
                )
                continue
            self.node_of[client] = reply.metadata.src_node_id
            self.client_of[reply.metadata.src_node_id] = client
        if not self.node_of:
            raise RuntimeError("no Flower node answered the discovery query")
        log.info("discovered %d of %d clients", len(self.node_of), wanted)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.node_of:
            self.discover(grid)
        round_ = self.server.round + 1
        sampled = self.server.sample(round_)
        failures = {c: "no Flower node serves this client" for c in sampled if c not in self.node_of}
        config = ConfigRecord({**self.server.round_config(round_), "spec": self.server.spec.to_json()})
        self.pending = (round_, sampled, time.time(), failures)
        # the payload is per client (a FedEP client without a site also gets x₀), so ``arrays`` is not used
        return [
            Message(
                RecordDict({"arrays": ArrayRecord(self.server.payload(c)), "config": config}),
                message_type=MessageType.TRAIN,
                dst_node_id=self.node_of[c],
            )
            for c in sampled
            if c in self.node_of
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_, sampled, started, failures = self.pending
        updates: dict[int, ClientUpdate] = {}
        for reply in replies:
            client = self.client_of.get(reply.metadata.src_node_id)
            if client is None or client not in sampled:
                continue
            if reply.has_error():
                failures[client] = f"error reply: {reply.error.reason}"
                continue
            try:
                metrics = dict(reply.content["metrics"])
                updates[client] = ClientUpdate(
                    _to_tensors(reply.content["arrays"]), int(metrics.pop("num-examples")), _scalars(metrics)
                )
            except (KeyError, TypeError, ValueError) as error:
                failures[client] = f"malformed reply: {error!r}"
        record = self.server.finish_round(round_, sampled, updates, failures, started)
        return ArrayRecord(self.server.broadcast()), MetricRecord(_scalars(record))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


# ------------------------------------------------------------------------------------ ClientApp / ServerApp
_TASKS: dict[str, Any] = {}


def _client_for(spec_json: str) -> FederatedClient:
    """The client of this run (data loaded once per process from the partition cache)."""
    if spec_json not in _TASKS:
        spec = RunSpec.from_json(spec_json)
        _TASKS[spec_json] = FederatedClient(spec, load_federated(spec.data))
    return _TASKS[spec_json]


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("this SuperNode has no partition-id in its --node-config")
    return int(context.node_config["partition-id"])


if HAVE_FLWR:
    client_app = ClientApp()
    server_app = ServerApp()

    @client_app.query()
    def _query(message: Message, context: Context) -> Message:
        client = _client_for(str(message.content["config"]["spec"]))
        partition = _partition_id(context)
        examples = len(client.task.clients[partition]) if partition < len(client.task.clients) else 0
        metrics = MetricRecord({"partition-id": partition, "num-examples": examples})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        config = dict(message.content["config"])
        client = _client_for(str(config.pop("spec")))
        site = _to_tensors(context.state["site"]) if "site" in context.state else None
        update = client.train(_partition_id(context), _to_tensors(message.content["arrays"]), config, site)
        if update.site is not None:
            context.state["site"] = ArrayRecord(update.site)
        metrics = MetricRecord({"num-examples": update.num_examples, **_scalars(update.metrics)})
        return Message(
            RecordDict({"arrays": ArrayRecord(update.arrays), "metrics": metrics}), reply_to=message
        )

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        out = Path(str(context.run_config["run-dir"]))
        spec = RunSpec.from_json((out / "run.json").read_text())
        _log_to_stdout()
        server = FederatedServer(spec, out, progress=lambda line: print(line, flush=True))
        remaining = spec.rounds - server.round
        if remaining > 0:
            strategy = LoriteStrategy(server)
            strategy.start(
                grid, ArrayRecord(server.broadcast()), num_rounds=remaining,
                timeout=float(context.run_config.get("round-timeout", 600.0)),
            )  # fmt: skip
        server.finalize()
        print(f"lorite: run complete ({server.round} rounds)", flush=True)


def _log_to_stdout() -> None:
    if not any(getattr(h, "_lorite", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("lorite: %(message)s"))
        handler._lorite = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# -------------------------------------------------------------------------------------------- launcher
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lorite-federated"
version = "1.0.0"
description = "lorite's federated algorithms (FedAvg, FedPA, FedEP) on Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "lorite"

[tool.flwr.app.components]
serverapp = "lorite.federated.flower:server_app"
clientapp = "lorite.federated.flower:client_app"

[tool.flwr.app.config]
run-dir = ""
round-timeout = 600.0
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise LoriteError(f"{what} exited with code {process.returncode} before listening (see its log)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise LoriteError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each started process group (they spawn the Server/ClientApp processes), then SIGKILL."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.time()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what is left of the group (app processes)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the folder that holds the lorite package
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    return env


def run_flower(
    spec: RunSpec,
    out: Path,
    resume: bool = False,
    progress: Callable[[str], None] | None = print,
    startup_timeout: float = 90.0,
) -> dict[str, Any]:
    """Run (or resume) the run in ``out`` on Flower — ``spec.engine`` ``flower`` or ``flower-sim`` — and
    return its final record. Every process it starts is stopped before it returns."""
    _require_flwr()
    out = Path(out).resolve()
    algorithm = spec.make_algorithm()
    if resume and algorithm.stateful_clients:
        raise LoriteError(
            "a stateful FedEP run (mode ep) cannot resume on Flower: its sites lived on the SuperNodes; "
            "resume it with --engine inprocess, or use fedsep/fedavg/fedpa"
        )
    load_federated(spec.data)  # the nodes then only read the cached partition
    if spec.engine == "flower-sim":
        _run_simulation_isolated(out, spec, progress, startup_timeout)
    else:
        _launch(out, spec, progress, startup_timeout, simulation=False)
    server = FederatedServer(spec, out, progress=None)
    if server.round < spec.rounds:
        raise LoriteError(
            f"the Flower run stopped after {server.round} of {spec.rounds} rounds (see {out / 'flower.log'})"
        )
    return {"round": server.round, **server.history[-1]}


def _launch(
    out: Path, spec: RunSpec, progress: Callable[[str], None] | None, startup_timeout: float, simulation: bool
) -> None:
    """Start a SuperLink (and, for deployment, one SuperNode per client), submit the app, stream its log."""
    work = Path(tempfile.mkdtemp(prefix="lorite-flower-"))
    processes: list[subprocess.Popen] = []
    log_path = out / "flower.log"
    try:
        app, home = work / "app", work / "flwr-home"
        app.mkdir()
        home.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        port = _free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "lorite"\n\n[superlink.lorite]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        env = _environment(home)
        bin_dir = Path(sys.executable).parent
        with open(log_path, "a") as log_file:

            def start(command: list[str]) -> subprocess.Popen:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                    start_new_session=True,
                )
                processes.append(process)
                return process

            superlink = [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            superlink.append("--disable-runtime-dependency-installation")
            if simulation:
                superlink.append("--simulation")
            _wait_for_port(port, start(superlink), startup_timeout, "the Flower SuperLink")
            if not simulation:
                for client in range(spec.data.clients):
                    start([
                        str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(_free_port()),
                        "--node-config", f"partition-id={client} num-partitions={spec.data.clients}",
                    ])  # fmt: skip
            command = [
                str(bin_dir / "flwr"),
                "run",
                str(app),
                "lorite",
                "--stream",
                "--run-config",
                f'run-dir="{out}"',
            ]
            if simulation:
                federation = (
                    f"num-supernodes={spec.data.clients} client-resources-num-cpus=1 "
                    f"init-args-num-cpus={max(1, os.cpu_count() or 1)} init-args-log-to-driver=true"
                )
                command += ["--federation-config", federation]
            runner = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                start_new_session=True,
            )  # fmt: skip
            processes.append(runner)
            for line in runner.stdout:
                log_file.write(line)
                log_file.flush()
                text = line.rstrip()
                if progress is not None and (text.startswith(("round ", "lorite: ")) or "Traceback" in text):
                    progress(text)
                if "lorite: run complete" in text:
                    break
            runner.stdout.close()
    finally:
        _stop(processes)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------ simulation in a network namespace
def _loopback_up() -> None:
    """Bring up ``lo`` in a fresh network namespace (SIOCSIFFLAGS; no iproute2 needed)."""
    import fcntl  # POSIX only: the namespace set-up runs on Linux alone

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0, b"\0" * 14)
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b"\0" * 14))


def _run_simulation_isolated(
    out: Path, spec: RunSpec, progress: Callable[[str], None] | None, startup_timeout: float
) -> None:
    if importlib.util.find_spec("ray") is None:
        raise LoriteError(
            "--engine flower-sim needs Flower's simulation engine (Ray): pip install 'flwr[simulation]==1.42.0'"
        )
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        raise LoriteError(
            "--engine flower-sim runs Ray inside a private network namespace (Ray listens on all interfaces), "
            "which needs Linux and unshare(1); use --engine flower (localhost processes) instead"
        )
    flags = ["--net", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        flags.append("--map-root-user")
    command = [
        unshare,
        *flags,
        sys.executable,
        "-m",
        "lorite.federated.flower",
        "simulate",
        str(out),
        str(startup_timeout),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        for line in process.stdout:
            if progress is not None:
                progress(line.rstrip())
        process.wait()
    finally:
        _stop([process])
    if process.returncode != 0:
        raise LoriteError(
            f"the Flower simulation exited with code {process.returncode} (unshare --net refused? see {out / 'flower.log'})"
        )


def _simulate_main(out: str, startup_timeout: str) -> int:
    """Entry point inside the network namespace: loopback up, then the usual launcher in simulation mode."""
    _loopback_up()
    spec = RunSpec.from_json((Path(out) / "run.json").read_text())
    try:
        _launch(
            Path(out), spec, lambda line: print(line, flush=True), float(startup_timeout), simulation=True
        )
    except LoriteError as error:
        print(f"lorite: error: {error}", flush=True)
        return 2
    return 0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "simulate":
    sys.exit(_simulate_main(sys.argv[2], sys.argv[3]))
