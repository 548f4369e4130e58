"""Two processes (torchrun, gloo): a SIGTERM reaching rank 1 alone stops both after the same step
with one checkpoint, and resuming on 2 processes equals the uninterrupted 2-process run bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from unet_fixtures import make_shapes_data, make_vae_dir, write_config

from ldm.train.checkpoint import latest_checkpoint, step_dir, verify_checkpoint

HERE = Path(__file__).parent


def torchrun(script: list[str], *args: str, port_offset: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = str(29600 + (os.getpid() + port_offset) % 1000)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *script, *args],
                          capture_output=True, text=True, env=env, timeout=240)


def test_a_signal_to_one_rank_stops_both_after_the_same_step_and_resume_is_exact(tmp_path):
    vae, data = make_vae_dir(tmp_path / "vae"), make_shapes_data(tmp_path / "data", 16)
    config = write_config(tmp_path / "c.yaml", run={"max_steps": 4, "checkpoint_every": 0})
    common = ["--config", str(config), "--vae", str(vae), "--data", str(data), "run.batch_size=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    result = torchrun(["-m", "ldm.cli.train_unet"], *common, "--output-dir", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]

    result = torchrun([str(HERE / "signal_one_rank.py")], *common, "--output-dir", str(stopped), port_offset=1)
    assert result.returncode != 0  # the workers exited 75; torchrun reports the group as failed
    assert "stopped by a signal after step 2" in result.stderr, result.stderr[-3000:]
    assert "SIGTERM received" in result.stderr
    checkpoint = latest_checkpoint(stopped)
    assert checkpoint == step_dir(stopped, 2) and verify_checkpoint(checkpoint) is None
    assert (checkpoint / "rng-0.json").is_file() and (checkpoint / "rng-1.json").is_file()  # both ranks took part
    assert not (stopped / "final").exists()

    result = torchrun(["-m", "ldm.cli.train_unet"], *common, "--output-dir", str(stopped), "--resume", "latest", port_offset=2)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = step_dir(straight, 4), step_dir(stopped, 4)
    for name in ("model-unet", "model-text_encoder", "ema-unet", "optimizer-main"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert json.loads((a / "state.json").read_text())["data"] == json.loads((b / "state.json").read_text())["data"]


def test_stage_one_on_two_processes_resumes_exactly(tmp_path):
    from test_vae_train import TINY

    from ldm.data.shapes import write_dataset

    write_dataset(tmp_path / "train", 16, size=32, seed=0)
    (tmp_path / "tiny.yaml").write_text(TINY)
    common = ["--config", str(tmp_path / "tiny.yaml"), "--data", str(tmp_path / "train"), "--quiet", "validate_every=0", "run.sample_every=0",
              "run.batch_size=2", "run.checkpoint_every=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for i, extra in enumerate(([str(straight)], [str(split), "--max-steps", "2"], [str(split), "--resume", "latest"])):
        result = torchrun(["-m", "ldm.cli.train_vae"], *common, "--output-dir", *extra, port_offset=10 + i)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = step_dir(straight, 4), step_dir(split, 4)
    assert json.loads((a / "state.json").read_text())["num_processes"] == 2
    for name in ("model-vae", "model-loss", "optimizer-vae", "optimizer-disc", "ema-vae"):  # the discriminator joins at step 2
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_a_distributed_worker_leaves_with_its_status_and_its_output_flushed():
    """`leave` skips the interpreter's teardown (gloo's threads can abort it) only under WORLD_SIZE > 1,
    after flushing what the run printed; a single process gets the status back."""
    from ldm.cli.common import leave

    assert leave(75) == 75  # this process: no WORLD_SIZE
    code = "import logging, sys; from ldm.cli.common import leave; print('final', end=''); " \
           "logging.basicConfig(stream=sys.stderr); logging.warning('logged'); leave(75); print('not reached')"
    for world, status in (("2", 75), ("1", 0)):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "WORLD_SIZE": world})
        assert result.returncode == status and "logged" in result.stderr, result.stderr[-2000:]
        assert result.stdout == ("final" if status else "finalnot reached\n")
