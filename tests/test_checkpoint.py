"""Training checkpoints: exact restore without pickle, atomic saves, pruning; sampler and LR schedule."""

import pickle
from pathlib import Path
import random

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from ldm.config import EMAConfig, OptimConfig
from ldm.train.checkpoint import (
    SaveFailed, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint, step_dir, verify_checkpoint,
)
from ldm.train.common import ResumableSampler, lr_factor, make_ema, make_lr_scheduler, make_optimizer

OPTIM = OptimConfig(lr=1e-2, warmup_steps=3, schedule="cosine", weight_decay=0.01)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = make_optimizer(model.parameters(), OPTIM)
    scheduler = make_lr_scheduler(optimizer, OPTIM, max_steps=20)
    ema = make_ema(model.parameters(), EMAConfig(enabled=True, decay=0.99))
    return model, optimizer, scheduler, ema


def _train(model, optimizer, scheduler, ema, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(5, 4)  # drawn from the global RNG: its state must be restored too
        noise = np.random.rand() + random.random()
        loss = (model(x) ** 2).mean() * (1 + noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.step(model.parameters())
        losses.append(loss.item())
    return losses


def _everything(model, optimizer, scheduler, ema):
    return (
        [p.detach().clone() for p in model.parameters()],
        [s.clone() for s in ema.shadow_params],
        [v.clone() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)],
        scheduler.get_last_lr(),
    )


def test_resume_is_exact_and_needs_no_pickle(tmp_path, monkeypatch):
    parts = _setup()
    _train(*parts, 4)
    kw = dict(models={"net": parts[0]}, optimizers={"net": parts[1]}, schedulers={"net": parts[2]}, emas={"net": parts[3]})
    folder = save_checkpoint(tmp_path, 4, state={"data": {"epoch": 1, "batch": 7}}, **kw)
    assert folder == step_dir(tmp_path, 4) and not list(folder.glob("*.pt"))
    uninterrupted = _train(*parts, 5)
    expected = _everything(*parts)

    def refuse(*a, **k):
        raise AssertionError("pickle must not be used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = _setup(seed=123)  # different initial weights: everything must come from the checkpoint
    random.seed(999), np.random.seed(999), torch.manual_seed(999)
    state = load_checkpoint(folder, models={"net": fresh[0]}, optimizers={"net": fresh[1]}, schedulers={"net": fresh[2]}, emas={"net": fresh[3]})
    assert state["step"] == 4 and state["data"] == {"epoch": 1, "batch": 7}
    assert _train(*fresh, 5) == uninterrupted  # same losses: same weights, optimizer, LR and RNG draws
    got = _everything(*fresh)
    for a, b in zip(expected[:3], got[:3]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert expected[3] == got[3]


def test_incomplete_or_corrupt_checkpoints_are_skipped_and_pruning_keeps_the_last(tmp_path):
    model, optimizer, scheduler, ema = _setup()
    kw = dict(models={"net": model}, optimizers={"net": optimizer}, keep_last=2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, **kw)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000003"]  # step 1 pruned once step 3 was complete
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 3)
    # A save that died before its manifest, and one whose weights were damaged afterwards.
    (step_dir(tmp_path, 3) / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 2)
    weights = step_dir(tmp_path, 2) / "model-net.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0" * 10)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="does not match its checksum"):
        resolve_resume(str(step_dir(tmp_path, 2)), tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    # The checkpoint a run resumed from survives pruning until newer ones exist.
    other = tmp_path / "other"
    save_checkpoint(other, 1, **kw)
    for step in (2, 3, 4):
        save_checkpoint(other, step, protect=step_dir(other, 1), **kw)
    assert step_dir(other, 1).exists() and not step_dir(other, 2).exists()


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),  # what Python's own writes raise
    # what safetensors raises:
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_during_a_save_removes_the_partial_folder_and_says_the_room_it_needs(tmp_path, monkeypatch, error):
    import ldm.train.checkpoint as ckpt

    model = torch.nn.Linear(256, 256)
    optimizer = make_optimizer(model.parameters(), OPTIM)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()  # the moments exist: a checkpoint holds ~3x the weights
    first = save_checkpoint(tmp_path, 1, models={"net": model}, optimizers={"net": optimizer})
    written = sum(p.stat().st_size for p in first.iterdir())
    real_save_file = ckpt.save_file

    def fills_the_disk(tensors, path, *a, **k):  # half a file lands, then the disk is full
        real_save_file(tensors, path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
        raise error

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    with pytest.raises(SaveFailed) as info:
        save_checkpoint(tmp_path, 2, models={"net": model}, optimizers={"net": optimizer})
    assert info.value.exit_status == 74 and info.value.checkpoint == first
    message = str(info.value)
    assert message.startswith("no space left on device: the checkpoint of step 2 needs ~") and str(first) in message
    assert 0.7 * written <= info.value.needed <= 1.3 * written  # the estimate is about what a checkpoint takes
    assert latest_checkpoint(tmp_path) == first and verify_checkpoint(first) is None
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-0000001"]  # no temporary folder left behind


def test_sampler_splits_a_global_batch_across_ranks_and_resumes_mid_epoch():
    n, batch = 23, 3
    single = list(ResumableSampler(n, batch * 2, seed=5))
    ranks = [list(ResumableSampler(n, batch, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 18 and all(len(r) == 9 for r in ranks)  # 23 // 6 whole global batches
    for step in range(3):
        together = set(ranks[0][step * batch : (step + 1) * batch]) | set(ranks[1][step * batch : (step + 1) * batch])
        assert together == set(single[step * 2 * batch : (step + 1) * 2 * batch])
    resumed = ResumableSampler(n, batch, seed=5, rank=1, world_size=2)
    resumed.set_epoch(0, start=6)
    assert list(resumed) == ranks[1][6:]
    resumed.set_epoch(1)
    assert list(resumed) != ranks[1] and sorted(resumed) != sorted(ranks[1])  # a fresh permutation
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(5, 3, seed=0, world_size=2)


def test_lr_schedule_warmup_and_cosine_endpoints():
    optim = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, optim, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, optim, 104) == pytest.approx(1.0)
    assert lr_factor(54, optim, 104) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(104, optim, 104) == pytest.approx(0.1)
    assert lr_factor(50, OptimConfig(), 104) == 1.0


def test_a_resumed_schedule_follows_the_config_not_the_checkpoint(tmp_path):
    """LambdaLR restores its saved base LR, which would silently undo an `optim.lr` override on
    --resume; the step count is what must come back."""
    model, optimizer, scheduler, ema = _setup()
    _train(model, optimizer, scheduler, ema, steps=5)
    folder = save_checkpoint(tmp_path, 5, models={"m": model}, optimizers={"main": optimizer}, schedulers={"lr": scheduler})

    same = _setup()
    load_checkpoint(folder, models={"m": same[0]}, optimizers={"main": same[1]}, schedulers={"lr": same[2]})
    assert same[2].last_epoch == 5 and same[1].param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(5, OPTIM, 20))

    torch.manual_seed(0)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    halved = OptimConfig(lr=5e-3, warmup_steps=3, schedule="cosine", weight_decay=0.01)
    optimizer2 = make_optimizer(model2.parameters(), halved)
    scheduler2 = make_lr_scheduler(optimizer2, halved, max_steps=40)  # a new peak LR and a longer run
    load_checkpoint(folder, models={"m": model2}, optimizers={"main": optimizer2}, schedulers={"lr": scheduler2})
    assert scheduler2.last_epoch == 5
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(5e-3 * lr_factor(5, halved, 40))
    scheduler2.step()
    assert scheduler2.get_last_lr()[0] == pytest.approx(5e-3 * lr_factor(6, halved, 40))


def test_a_resave_that_dies_between_its_renames_keeps_the_parked_copy_usable(tmp_path):
    """Re-saving an existing step parks the old copy as .old-step-N, then renames the new one in.
    A crash between the two renames must not hide the parked (complete) checkpoint."""
    model, optimizer, *_ = _setup()
    kw = dict(models={"net": model}, optimizers={"net": optimizer}, keep_last=2)
    save_checkpoint(tmp_path, 1, **kw)
    save_checkpoint(tmp_path, 2, **kw)
    root = tmp_path / "checkpoints"
    (root / "step-0000002").rename(root / ".old-step-0000002")  # the state a crash leaves
    (root / ".tmp-step-0000002").mkdir()
    assert latest_checkpoint(tmp_path) == root / ".old-step-0000002"
    assert resolve_resume("latest", tmp_path) == root / ".old-step-0000002"
    save_checkpoint(tmp_path, 2, **kw)  # the resumed run re-reaches step 2: the new copy replaces the parked one
    save_checkpoint(tmp_path, 3, **kw)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000003"]  # leftovers cleaned, step 1 pruned


def test_foreach_ema_matches_the_loop_and_shares_checkpoints():
    """The trainers ask diffusers' EMAModel for its multi-tensor update on CUDA (make_ema(foreach=True)):
    it must give the loop's numbers, with warm-up, and a state dict either kind loads (a run saved on
    a GPU resumes on a CPU)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    config = EMAConfig(enabled=True, decay=0.999, warmup=True)
    loop, fused = make_ema(model.parameters(), config), make_ema(model.parameters(), config, foreach=True)
    assert not loop.foreach and fused.foreach
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        loop.step(model.parameters())
        fused.step(model.parameters())
    moved = sum((s - p).abs().sum().item() for s, p in zip(loop.shadow_params, model.parameters()))
    assert moved > 0  # the shadows lag the weights: the update did something
    for a, b in zip(loop.shadow_params, fused.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    resumed = make_ema(model.parameters(), config)
    resumed.load_state_dict(fused.state_dict())
    assert resumed.optimization_step == fused.optimization_step == 5
    for a, b in zip(resumed.shadow_params, fused.shadow_params):
        assert torch.equal(a, b)
