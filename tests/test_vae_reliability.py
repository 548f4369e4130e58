"""R3/R4 for stage 1: ldm-train-vae stops on SIGTERM after the step with a checkpoint (exit 75) and
resumes bit for bit; a non-finite loss skips the whole update (no optimizer, schedule or EMA step);
run.max_bad_steps in a row stop the run with exit 3 and the last good checkpoint intact."""

import json
import os
import signal

import torch
from safetensors.torch import load_file
from test_vae_train import TINY, shapes  # noqa: F401  (the module's data fixture)

from ldm.cli.train_vae import main
from ldm.train.checkpoint import latest_checkpoint, load_state, step_dir
from ldm.train.guards import EXIT_NUMERICAL_FAULT, EXIT_PREEMPTED
from ldm.train.vae_losses import AutoencoderLoss

COMPARED = ("model-vae", "ema-vae", "optimizer-vae")
assert TINY  # the config the fixture writes


def _args(shapes, out, *extra):  # noqa: F811
    return ["--config", str(shapes / "tiny.yaml"), "--data", str(shapes / "train"), "--output-dir", str(out), "--quiet",
            "validate_every=0", "run.sample_every=0", *extra]


def _patch_generator_loss(monkeypatch, on_call):
    """Wrap the autoencoder loss; `on_call(i, loss)` for the i-th micro-batch may return a new loss."""
    original, calls = AutoencoderLoss.generator_loss, []

    def wrapped(self, *a, **k):
        loss, logs = original(self, *a, **k)
        calls.append(1)
        return on_call(len(calls) - 1, loss), logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", wrapped)


def _same(a, b, names=COMPARED):
    for name in names:
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_a_non_finite_loss_skips_the_update(shapes, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "nan"
    _patch_generator_loss(monkeypatch, lambda i, loss: loss * float("nan") if i == 1 else loss)
    assert main(_args(shapes, out, "--max-steps", "3", "run.checkpoint_every=1", "loss.disc_weight=0")) == 0
    _same(step_dir(out, 1), step_dir(out, 2))  # step 2 was skipped: weights, EMA and optimizer as after step 1
    assert load_state(step_dir(out, 1), "scheduler-vae") == load_state(step_dir(out, 2), "scheduler-vae")
    assert json.loads((step_dir(out, 2) / "state.json").read_text())["guard"] == {"bad_total": 1, "bad_in_a_row": 1}
    three, one = load_file(step_dir(out, 3) / "model-vae.safetensors"), load_file(step_dir(out, 1) / "model-vae.safetensors")
    assert not all(torch.equal(three[k], one[k]) for k in three) and all(torch.isfinite(t).all() for t in three.values())


def test_bad_steps_in_a_row_stop_with_status_3_and_a_good_checkpoint(shapes, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "diverged"
    _patch_generator_loss(monkeypatch, lambda i, loss: loss * float("inf") if i >= 2 else loss)
    code = main(_args(shapes, out, "--max-steps", "20", "run.checkpoint_every=1", "run.max_bad_steps=2", "loss.disc_weight=0"))
    assert code == EXIT_NUMERICAL_FAULT
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ldm-train-vae: 2 non-finite losses or gradients in a row up to step 4")
    # step 3 was skipped (its checkpoint holds step 2's weights), step 4 was the second bad one in a row
    assert latest_checkpoint(out) == step_dir(out, 3) and not (out / "final").exists()
    _same(step_dir(out, 2), step_dir(out, 3))


def test_sigterm_saves_exits_75_and_resume_is_bit_exact(shapes, tmp_path, monkeypatch):  # noqa: F811
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(_args(shapes, straight, "run.checkpoint_every=0")) == 0  # 4 steps, the GAN joining at step 3
    _patch_generator_loss(monkeypatch, lambda i, loss: (os.kill(os.getpid(), signal.SIGTERM), loss)[1] if i == 0 else loss)
    assert main(_args(shapes, stopped, "run.checkpoint_every=0")) == EXIT_PREEMPTED  # the signal arrives during step 1
    assert latest_checkpoint(stopped) == step_dir(stopped, 1) and not (stopped / "final").exists()
    monkeypatch.undo()
    assert main(_args(shapes, stopped, "run.checkpoint_every=0", "--resume", "latest")) == 0
    _same(step_dir(straight, 4), step_dir(stopped, 4), COMPARED + ("model-loss", "optimizer-disc"))
    fa = load_file(straight / "final" / "diffusion_pytorch_model.safetensors")
    fb = load_file(stopped / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


CRASH = """
import sys
from ldm.cli.train_vae import main
from ldm.train.vae_losses import AutoencoderLoss

def generator_loss(self, *a, **k):
    raise RuntimeError("injected failure in the loop")
AutoencoderLoss.generator_loss = generator_loss
sys.exit(main(sys.argv[1:]))
"""


def test_a_crash_with_loader_workers_alive_exits_instead_of_hanging(shapes, tmp_path):  # noqa: F811
    """Stage 1 closes its loader's workers however the loop ends (as stage 2 does; see
    tests/test_reliability_training.py): a crash used to leave the process waiting on them forever."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CRASH, *_args(shapes, tmp_path / "out", "--max-steps", "20", "data.num_workers=2")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1 and "injected failure in the loop" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - start < 120
