"""R3 preemption and R4 numerical faults in ldm-train-unet: signals stop after a step with a
checkpoint (exit 75) and resume continues bit for bit; non-finite updates are skipped, counted,
and fatal (exit 3) after run.max_bad_steps in a row, with the last good checkpoint intact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from unet_fixtures import make_shapes_data, make_vae_dir, write_config

import ldm.train.checkpoint as checkpoint_module
import ldm.train.unet as unet_module
from ldm.cli.train_unet import main
from ldm.train.checkpoint import latest_checkpoint, load_state, step_dir, verify_checkpoint
from ldm.train.guards import EXIT_NUMERICAL_FAULT, EXIT_PREEMPTED

COMPARED = ("model-unet", "model-text_encoder", "ema-unet", "optimizer-main")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return {"vae": make_vae_dir(root / "vae"), "data": make_shapes_data(root / "data", 16), "config": write_config(root / "c.yaml")}


def args(setup, out, *extra):
    return ["--config", str(setup["config"]), "--vae", str(setup["vae"]), "--data", str(setup["data"]), "--output-dir", str(out), *extra]


def assert_same_checkpoint(a, b):
    for name in COMPARED:
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}/{k}"
    assert json.loads((a / "state.json").read_text())["data"] == json.loads((b / "state.json").read_text())["data"]
    assert load_state(a, "scheduler-lr") == load_state(b, "scheduler-lr")


def patch_loss(monkeypatch, on_call):
    """Wrap the stage-2 loss; `on_call(i, loss)` (i = 0, 1, ... per micro-batch) may return a new loss."""
    calls = []
    original = unet_module.diffusion_loss

    def wrapped(*a, **k):
        loss = original(*a, **k)
        calls.append(1)
        return on_call(len(calls) - 1, loss)

    monkeypatch.setattr(unet_module, "diffusion_loss", wrapped)
    return calls


# ---- R3: preemption --------------------------------------------------------------------------------


def test_sigterm_saves_exits_75_and_resume_is_bit_exact(setup, tmp_path, capsys):
    out = tmp_path / "pre"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli.train_unet", *args(setup, out, "--max-steps", "1000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):  # at least one step done: mid-run
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("ldm-train-unet: stopped by a signal after step")
    saved = latest_checkpoint(out)
    k = json.loads((saved / "state.json").read_text())["step"]
    assert 1 <= k < 1000 and not (out / "final").exists() and stdout == ""

    # resume to k + 2; an uninterrupted run of k + 2 steps must be identical
    assert main(args(setup, out, "--max-steps", str(k + 2), "--resume", "latest")) == 0
    straight = tmp_path / "straight"
    assert main(args(setup, straight, "--max-steps", str(k + 2))) == 0
    assert_same_checkpoint(step_dir(out, k + 2), step_dir(straight, k + 2))


def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(setup, tmp_path):
    """systemd, Slurm and a terminal's Ctrl-C signal every process of the job, DataLoader workers
    included. A worker that died of it used to fail the run ("DataLoader worker killed by
    signal") with no checkpoint: workers must leave stopping to the training process."""
    out = tmp_path / "group"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli.train_unet", *args(setup, out, "--max-steps", "1000"), "data.num_workers=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the training process and both of its loader workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    assert verify_checkpoint(latest_checkpoint(out)) is None
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["step"] >= 1


def test_sigint_stops_after_the_step_and_a_second_one_during_the_save_breaks_nothing(setup, tmp_path, monkeypatch, capfd):
    out = tmp_path / "int"
    # first SIGINT during step 3 (after the checkpoint of step 2); a second one while saving step 3
    patch_loss(monkeypatch, lambda i, loss: (os.kill(os.getpid(), signal.SIGINT), loss)[1] if i == 2 else loss)
    original_save_model = checkpoint_module.save_model

    def save_model(model, path, *a, **k):
        if "step-0000003" in str(path):
            os.kill(os.getpid(), signal.SIGINT)
        return original_save_model(model, path, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_model", save_model)
    before = signal.getsignal(signal.SIGINT)
    assert main(args(setup, out, "--max-steps", "6", "run.checkpoint_every=2")) == 130  # interrupted mid-save
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert "SIGINT received" in capfd.readouterr().err
    assert latest_checkpoint(out) == step_dir(out, 2) and verify_checkpoint(step_dir(out, 2)) is None
    assert (out / "checkpoints" / ".tmp-step-0000003").is_dir()  # the half-written save, ignored

    # one signal: stop after the current step (step 3 of the resumed run) with a checkpoint, exit 75
    monkeypatch.setattr(checkpoint_module, "save_model", original_save_model)
    patch_loss(monkeypatch, lambda i, loss: (os.kill(os.getpid(), signal.SIGINT), loss)[1] if i == 0 else loss)
    assert main(args(setup, out, "--max-steps", "6", "run.checkpoint_every=2", "--resume", "latest")) == EXIT_PREEMPTED
    assert latest_checkpoint(out) == step_dir(out, 3) and not (out / "checkpoints" / ".tmp-step-0000003").exists()
    assert "--resume latest" in capfd.readouterr().err.strip().splitlines()[-1]
    assert main(args(setup, out, "--max-steps", "4", "--resume", "latest")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002", "step-0000003", "step-0000004"] or \
        sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003", "step-0000004"]


# ---- R4: numerical faults ------------------------------------------------------------------------


def nan_on(calls):
    return lambda i, loss: loss * float("nan") if i in calls else loss


def test_a_non_finite_loss_skips_the_update_on_every_count(setup, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    patch_loss(monkeypatch, lambda i, loss: loss * (float("nan") if i == 1 else float("inf") if i == 2 else 1.0))
    assert main(args(setup, out, "--max-steps", "4", "run.checkpoint_every=1", "run.keep_last=0")) == 0
    one, three = step_dir(out, 1), step_dir(out, 3)
    # steps 2 and 3 were skipped: weights, EMA, optimizer state and LR schedule are as after step 1
    for name in COMPARED:
        a, b = load_file(one / f"{name}.safetensors"), load_file(three / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert load_state(one, "scheduler-lr") == load_state(three, "scheduler-lr")
    assert json.loads((three / "state.json").read_text())["guard"] == {"bad_total": 2, "bad_in_a_row": 2}
    four = load_file(step_dir(out, 4) / "model-unet.safetensors")
    assert not all(torch.equal(four[k], load_file(one / "model-unet.safetensors")[k]) for k in four)  # step 4 trained
    assert all(torch.isfinite(t).all() for t in four.values())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["bad_steps"] for m in logged] == [0, 1, 2, 2]


def test_k_bad_steps_in_a_row_stop_the_run_with_status_3_and_a_good_checkpoint(setup, tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "diverged"
    patch_loss(monkeypatch, nan_on(set(range(2, 100))))  # steps 3, 4, 5, ... are non-finite
    code = main(args(setup, out, "--max-steps", "50", "run.checkpoint_every=2", "run.max_bad_steps=3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_NUMERICAL_FAULT
    assert err[-1].startswith("ldm-train-unet: 3 non-finite losses or gradients in a row up to step 5")
    assert str(step_dir(out, 4)) in err[-1] and sum("update skipped" in r.message for r in caplog.records) == 3
    good = latest_checkpoint(out)
    assert good == step_dir(out, 4) and not (out / "final").exists()
    assert all(torch.isfinite(t).all() for t in load_file(good / "model-unet.safetensors").values())


def test_max_bad_steps_is_validated(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args(setup, tmp_path / "x", "run.max_bad_steps=0"))
    assert e.value.code == 2 and "run.max_bad_steps must be ≥ 1" in capsys.readouterr().err


# ---- a crash with loader workers alive -------------------------------------------------------------

CRASH = """
import sys
import ldm.train.unet as unet
import ldm.data.datasets as datasets
from ldm.cli.train_unet import main

where = sys.argv[1]
if where == "loop":  # an error in the training process, mid-run
    def diffusion_loss(*a, **k):
        raise RuntimeError("injected failure in the loop")
    unet.diffusion_loss = diffusion_loss
else:  # an error inside a DataLoader worker (forked: it inherits this patch)
    item = datasets.CaptionDataset.__getitem__
    def getitem(self, i):
        if i == 5:
            raise RuntimeError("injected failure in a worker")
        return item(self, i)
    datasets.CaptionDataset.__getitem__ = getitem
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["loop", "worker"])
def test_a_crash_with_loader_workers_alive_exits_instead_of_hanging(setup, tmp_path, where):
    # Workers ignore SIGTERM while their parent lives (so a job-wide SIGTERM cannot kill them before
    # the trainer saves), and multiprocessing's exit handler ends workers with SIGTERM: a crash that
    # left them running used to hang the process at exit, forever.
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CRASH, where, *args(setup, tmp_path / "out", "--max-steps", "20", "data.num_workers=2",
                                                                        "run.batch_size=2", "run.checkpoint_every=0")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"injected failure in {'the loop' if where == 'loop' else 'a worker'}" in result.stderr
    assert time.monotonic() - start < 120
