"""Several ranks of ``lightning-skew bench`` on this host, started the way torchrun starts them (env://, gloo)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The command as the user gave it, for the ranks' report (they get ``--output`` added when it had none).
COMMAND_ENV = "LIGHTNING_SKEW_BENCH_COMMAND"


def launched_rank() -> int | None:
    """This process's rank when it is one of several ranks that :func:`launch_ranks` (or torchrun) started, else
    ``None``. Rendezvous variables alone do not count: Lightning leaves them set in a process after a fit."""
    launched = COMMAND_ENV in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(argv: Sequence[str], world_size: int, output: str | None) -> dict[str, Any]:
    """Run ``lightning-skew bench argv`` as ``world_size`` processes on this host and return rank zero's report.

    Rank zero's output goes to this process's; the others' is kept and shown only if a rank fails (then every
    rank is ended: the others would wait for it in a collective). Each rank runs with ``OMP_NUM_THREADS`` as
    set here (1 when unset), so that the ranks do not oversubscribe the cores.
    """
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="lightning-skew-bench-ranks-") as folder:
        report_path = output or str(Path(folder) / "report.json")
        args = list(argv)
        if output is None:
            args += ["--output", report_path]
        procs, logs = [], []
        for rank in range(world_size):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world_size),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0",
                   "LOCAL_WORLD_SIZE": str(world_size), COMMAND_ENV: shlex.join(argv)}
            env.setdefault("OMP_NUM_THREADS", "1")
            log = None if rank == 0 else open(Path(folder) / f"rank{rank}.log", "w+")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "lightning_skew.cli", "bench", *args], env=env,
                                          stdout=log, stderr=subprocess.STDOUT if log else None))
        try:
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    break
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
        if failed:
            tails = []
            for rank, code in failed:
                if logs[rank] is not None:
                    logs[rank].seek(0)
                    tails.append(f"--- rank {rank} (exit {code}) ---\n{logs[rank].read()[-4000:]}")
            raise RuntimeError(f"lightning-skew bench on {world_size} ranks failed on ranks {failed}\n"
                               + "\n".join(tails))
        for log in logs:
            if log is not None:
                log.close()
        return json.loads(Path(report_path).read_text())
