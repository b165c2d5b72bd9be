"""Run launch/train.py on N ranks, attempt after attempt, the way ``torchrun --max-restarts`` does
after a rank dies: every rank of the attempt is killed (SIGKILL) and a new attempt starts with
``TORCHELASTIC_RESTART_COUNT`` one higher, on a fresh port and process group. The ranks are forked
from this process after torch, transformers and DeepSpeed are imported, so an attempt does not pay
Python's imports again: the kill-point test restarts a few dozen times in a couple of minutes.

    python tests/distributed/fork_restarts.py --attempts K --nproc 2 --log DIR -- <launch/train.py arguments>

Prints one JSON line: ``{"attempts": [[exit code per rank], ...], "seconds": [...]}``; it stops after
the first attempt whose ranks all exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(argv: list[str], rank: int, nproc: int, attempt: int, port: int, log: Path) -> None:
    """The child: one rank of one attempt (never returns)."""
    code = 1
    try:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_RESTART_COUNT=str(attempt),
        )
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from lift_ds.train import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(argv: list[str], attempts: int, nproc: int, log_dir: Path) -> dict:
    # imported once here, inherited by every forked rank (what an attempt would otherwise import again)
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import transformers.quantizers.auto  # noqa: F401 - transformers imports torchao here when it builds a model
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import lift_ds.api  # noqa: F401
    import lift_ds.checkpoint_find  # noqa: F401
    import lift_ds.export  # noqa: F401
    import lift_ds.recipe  # noqa: F401
    from lift_ds.backends import deepspeed as _  # noqa: F401

    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        pass

    log_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {"attempts": [], "seconds": []}
    start = os.times()
    for attempt in range(attempts):
        t0, port = time.perf_counter(), _free_port()
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                _rank(argv, rank, nproc, attempt, port, log_dir / f"attempt{attempt}.rank{rank}.log")
            pids.append(pid)
        codes: dict[int, int] = {}
        while len(codes) < nproc:
            pid, status = os.waitpid(-1, 0)
            if pid not in pids:
                continue
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0:  # a rank died: the others may wait in a collective forever, as under torchrun
                for other in pids:
                    if other not in codes:
                        os.kill(other, signal.SIGKILL)
        out["attempts"].append([codes[p] for p in pids])
        out["seconds"].append(round(time.perf_counter() - t0, 2))
        if all(c == 0 for c in codes.values()):
            break
    end = os.times()  # CPU time of every rank of every attempt (the wall time on a loaded machine says little)
    out["rank_cpu_seconds"] = round(
        end.children_user + end.children_system - start.children_user - start.children_system, 1
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--attempts", type=int, required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    print(json.dumps(run(args, a.attempts, a.nproc, a.log)))
