"""FSDP2 on CPU: our PEFT-wrapped tiny LLaMA, sharded over 2 gloo processes with torch's fully_shard, trains
to the same adapter as one unsharded process, and the gathered adapter is a full (unsharded) state dict."""

from __future__ import annotations

import socket
import subprocess
import sys

import torch
from fsdp_worker import adapter_state, build_model, train

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_sharded_training_matches_one_process(tiny_model_dir, tmp_path):
    out, port = tmp_path / "sharded.pt", free_port()
    worker = [sys.executable, str(REPO / "tests" / "fsdp_worker.py"), str(tiny_model_dir), str(out)]
    processes = [subprocess.Popen([*worker, str(rank), "2", str(port)], cwd=REPO) for rank in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    sharded = torch.load(out)
    assert sharded["sharded_params"] > 0  # the parameters really were DTensors spread over the mesh

    model = build_model(str(tiny_model_dir))
    initial = adapter_state(model.state_dict())
    train(model)
    reference = adapter_state(model.state_dict())

    assert sharded["adapter"].keys() == reference.keys() and len(reference) > 0
    for name, tensor in reference.items():
        gathered = sharded["adapter"][name]
        assert gathered.shape == tensor.shape, name  # full tensors, not shards
        torch.testing.assert_close(gathered, tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(reference[name], initial[name]) for name in reference)  # training moved them
