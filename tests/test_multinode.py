"""A 2-node-shaped torchrun job on one machine: two torchrun agents (one process each) meet through a c10d
rendezvous on localhost and train one run together on gloo, as two machines would (README, "Several machines")."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.cli_helpers import env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_one_run(tmp_path) -> None:
    port, out = free_port(), tmp_path / "runs"
    sets = ["data.size=[64,64]", "data.options.n=40", "model.decoder_channels=[16,16,16,8,8]", "train.steps=6",
            "train.eval_every=6", "train.checkpoint_every=3", "train.batch_size=2", "train.progress=false",
            "train.threads=1", "train.lr=0.001", "train.lr_schedule=constant", "train.warmup=0", "split.labeled=0.25",
            "split.val=0.2", "split.test=0.2", "name=two-nodes", f"out_dir={out}", "train.device=cpu"]
    agents = []
    for node in range(2):
        # what each machine runs, with its own address for --local-addr; is_host: node 0 serves the rendezvous
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "semiseg-test",
               "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--local-addr", "127.0.0.1",
               "--max-restarts", "0", "-m", "semiseg", "train", *[x for s in sets for x in ("--set", s)]]
        agents.append(subprocess.Popen(cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
    logs = []
    for agent in agents:
        try:
            logs.append(agent.communicate(timeout=400)[0])
        finally:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    run = out / "two-nodes"
    results = json.loads((run / "results.json").read_text())
    assert results["trained_steps"] == 6 and results["test"]["dice"] >= 0
    # train.lr_scaling=linear (default): 2 processes of batch 2 are a global batch of 4 trained at 2 x train.lr,
    # which is what every logged step shows: the world had two members
    lrs = [json.loads(x)["lr"] for x in (run / "stages" / "0-supervised" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in x]
    assert lrs and all(lr == pytest.approx(0.002) for lr in lrs)
