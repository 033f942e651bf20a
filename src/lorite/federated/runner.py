"""Running a federated run (:class:`~lorite.federated.server.RunSpec`) on its engine: the deterministic
in-process engine (clients = data shards, looped over in one process) is here; Flower's is
:mod:`lorite.federated.flower`. Both drive the same :class:`~lorite.federated.server.FederatedServer` and
:class:`~lorite.federated.server.FederatedClient`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core import ClientDropout, ClientUpdate, log
from .server import FederatedClient, FederatedServer, RunSpec, prepare_run

ReplyHook = Callable[[int, int, ClientUpdate], ClientUpdate]


def run_inprocess(
    server: FederatedServer, client: FederatedClient | None = None, reply_hook: ReplyHook | None = None
) -> dict[str, Any]:
    """Run the remaining rounds in this process, clients one after another.

    A client that raises is excluded from the round (a drop-out) — unless every sampled client fails
    with the same error that is not a simulated drop-out, which is a bug and is raised. ``reply_hook``
    (tests) may alter or replace a client's reply before the server sees it."""
    client = client or FederatedClient(server.spec, server.task, server.algorithm)
    for round_ in range(server.round + 1, server.spec.rounds + 1):
        started = time.time()
        sampled = server.sample(round_)
        config = server.round_config(round_)
        replies: dict[int, ClientUpdate] = {}
        failures: dict[int, str] = {}
        errors: list[BaseException] = []
        for cid in sampled:
            try:
                update = client.train(cid, server.payload(cid), config, server.sites.get(cid))
            except Exception as error:  # a failing client is excluded, not fatal
                failures[cid] = f"{type(error).__name__}: {error}"
                errors.append(error)
                continue
            if update.site is not None:
                server.sites[cid] = update.site
            replies[cid] = reply_hook(round_, cid, update) if reply_hook else update
        real = [e for e in errors if not isinstance(e, ClientDropout)]
        if len(real) == len(sampled) and len({str(e) for e in real}) == 1:
            raise real[0]
        server.finish_round(round_, sampled, replies, failures, started)
    return server.finalize()


def run(
    spec: RunSpec, out: Path, resume: bool = False, progress: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Start (or, with ``resume``, continue) the run in ``out`` on ``spec.engine``."""
    out = Path(out)
    if not resume:
        prepare_run(spec, out)
    if spec.engine == "inprocess":
        server = FederatedServer(spec, out, progress=progress)
        if server.round >= spec.rounds:
            log.info("the run in %s already has %d rounds", out, server.round)
            return server.finalize()
        return run_inprocess(server)
    from .flower import run_flower  # lazy: flower.py imports flwr (optional, slow to import)

    return run_flower(spec, out, resume=resume, progress=progress)
