"""launch/torchrun_multi_node.sh for real: two torchrun "nodes" on localhost (one rank each, c10d
rendezvous on 127.0.0.1) train LIFT ZeRO-2 over a few phases; the weights equal a single-node 2-rank run.

The deepspeed hostfile script (launch/deepspeed_hostfile.sh) starts remote ranks through pdsh/ssh,
which this machine does not have; it is not run here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_model_dir, write_sentiment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(files: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(files / "model"),
        "--data",
        str(files / "train.jsonl"),
        "--format",
        "classification",
        "--max_steps",
        "10",
        "--lr",
        "0.01",
        "--include_head",
        "--seq_len",
        "32",
        "--output_dir",
        str(out),
        "--save_every",
        "0",
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode")
    make_model_dir(d / "model", layers=4)
    write_sentiment(d / "train.jsonl", 64)
    return d


def final(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def test_two_nodes_on_localhost_equal_one_node(files, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DS_CONFIG": "ds_configs/quickstart_cpu.json",
    }
    one = tmp_path / "one"
    proc = subprocess.run(
        ["bash", "launch/torchrun_single_node.sh", *train_args(files, one)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "NPROC": "2"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = tmp_path / "two"
    node_env = {
        **env,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NNODES": "2",
        "NPROC": "1",
        "RDZV_ID": "lift_ds_test",
    }
    nodes = [
        subprocess.Popen(
            ["bash", "launch/torchrun_multi_node.sh", *train_args(files, two)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**node_env, "NODE_RANK": str(r)},
            cwd=REPO,
        )
        for r in (0, 1)
    ]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-4000:]
    a, b, start = final(one), final(two), start_weights(files)
    assert any(not torch.equal(a[k], start[k]) for k in a), "nothing trained"
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5), (
            k,
            (a[k].float() - b[k].float()).abs().max().item(),
        )


def start_weights(files: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(files / "model" / "model.safetensors")
