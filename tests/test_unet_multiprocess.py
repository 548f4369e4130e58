"""Two processes (torchrun, gloo on the CPU) with batch B equal one process with batch 2B."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from unet_fixtures import make_shapes_data, make_vae_dir, write_config

from ldm.cli.train_unet import main
from ldm.train.common import make_loader


def test_each_process_reads_its_own_half_of_the_global_batch(tmp_path):
    data = make_shapes_data(tmp_path / "data", 16)
    from ldm.data import open_dataset

    dataset = open_dataset(str(data), resolution=32, seed=0)
    one = [b["key"] for _, b in zip(range(2), make_loader(dataset, 4, 0, 0, 1, 0))]
    ranks = [[b["key"] for _, b in zip(range(2), make_loader(dataset, 2, 0, r, 2, 0))] for r in range(2)]
    for step in range(2):
        mine = [set(ranks[r][step]) for r in range(2)]
        assert not mine[0] & mine[1]  # different samples on each process
        assert mine[0] | mine[1] == set(one[step])  # together: the 1-process batch
        # sample i of rank r is sample i·W + r of the 1-process batch (the draws are keyed on that)
        assert [one[step][i * 2 + r] for r in range(2) for i in range(2)] == ranks[0][step] + ranks[1][step]


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    vae, data = make_vae_dir(tmp_path / "vae"), make_shapes_data(tmp_path / "data", 16)
    # a large Adam ε makes the update proportional to the gradient, so float-level differences of
    # the all-reduce stay float-level instead of being normalised up to a full step
    config = write_config(tmp_path / "c.yaml", optim={"lr": 1e-2, "eps": 1e-2}, run={"max_steps": 3})
    common = ["--config", str(config), "--vae", str(vae), "--data", str(data), "--max-steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
         "-m", "ldm.cli.train_unet", *common, "--output-dir", str(tmp_path / "two"), "run.batch_size=2"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert main([*common, "--output-dir", str(tmp_path / "one"), "run.batch_size=4"]) == 0

    two, one = tmp_path / "two" / "checkpoints" / "step-0000003", tmp_path / "one" / "checkpoints" / "step-0000003"
    assert json.loads((two / "state.json").read_text())["num_processes"] == 2
    assert (two / "rng-1.json").is_file()
    for name in ("model-unet", "model-text_encoder", "ema-unet"):
        a, b = load_file(one / f"{name}.safetensors"), load_file(two / f"{name}.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-4, msg=f"{name}/{k}")
    loss = lambda p: [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss(tmp_path / "two") == pytest.approx(loss(tmp_path / "one"), rel=1e-5)
    assert loss(tmp_path / "one")[0] != loss(tmp_path / "one")[-1]  # it trained
