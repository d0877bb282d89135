"""Start several processes of a test worker script the way torchrun does (env:// rendezvous on localhost)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(script: str | Path, world_size: int, args: list[str], nodes: int = 1) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    per_node = world_size // nodes
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world_size),
               "RANK": str(rank), "LOCAL_RANK": str(rank % per_node), "NODE_RANK": str(rank // per_node),
               "LOCAL_WORLD_SIZE": str(per_node), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        if nodes > 1:  # as torchrun starts each node's processes (Lightning's TorchElasticEnvironment)
            env.update({"GROUP_RANK": str(rank // per_node), "TORCHELASTIC_RUN_ID": port})
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def launch_until_killed(script: str | Path, world_size: int, args: list[str], timeout: float = 300) -> str:
    """Run ``script`` as ``world_size`` ranks until rank zero is killed (SIGKILL, by the script itself), then end
    the other ranks, which wait for it in a collective; fail if rank zero ends any other way. Rank zero's output."""
    procs = _start(script, world_size, args)
    try:
        out, _ = procs[0].communicate(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert procs[0].returncode == -9, f"rank 0 was not killed (exit {procs[0].returncode}):\n{out[-4000:]}"
    return out


def launch(script: str | Path, world_size: int, args: list[str], timeout: float = 300, nodes: int = 1) -> list[str]:
    """Run ``script`` as ``world_size`` ranks (on ``nodes`` simulated nodes of ``world_size // nodes`` processes
    each, all on this host); return each rank's output, or fail with all of it."""
    procs = _start(script, world_size, args, nodes)
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} (exit {procs[r].returncode}) ---\n{outputs[r][-4000:]}" for r, _ in failed)
        raise AssertionError(f"{script} failed on ranks {failed}:\n{tails}")
    return outputs


def finish_rank() -> None:
    """End a worker rank once its work is done and written, skipping interpreter teardown: destructors of
    gloo's and TorchRec's background threads can abort a finished process ("terminate called without an
    active exception", exit -6). Every collective has completed by then, so no rank waits on this one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
