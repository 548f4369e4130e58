"""R2: a save killed at any stage leaves the previous checkpoint as the one `--resume latest` finds,
and its leftovers do not break the next save. A raised exception leaves the files exactly as a kill
would: save_checkpoint has no cleanup handlers."""

import pytest
import torch
from test_checkpoint import _setup, _train

import ldm.train.checkpoint as ck
from ldm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_dir, verify_checkpoint


class Killed(Exception):
    pass


# (stage, function of ldm.train.checkpoint that dies, on which call)
STAGES = [
    ("after the temporary folder", "save_state", 0),  # the first save_state writes the RNG state
    ("after the RNG state", "save_model", 0),
    ("after the models", "save_state", 1),  # the optimizer
    ("after the manifest, before the rename", "_fsync_dir", 0),
    ("after the rename, before pruning", "_prune", 0),
]


@pytest.mark.parametrize("stage,function,call", STAGES, ids=[s[0] for s in STAGES])
def test_a_save_killed_at_each_stage_keeps_the_previous_checkpoint(tmp_path, monkeypatch, stage, function, call):
    model, optimizer, scheduler, ema = _setup()
    kw = dict(models={"net": model}, optimizers={"net": optimizer}, schedulers={"net": scheduler}, emas={"net": ema}, keep_last=1)
    _train(model, optimizer, scheduler, ema, 2)
    previous = save_checkpoint(tmp_path, 2, state={"data": {"epoch": 0, "batch": 2}}, **kw)
    _train(model, optimizer, scheduler, ema, 2)

    original, calls = getattr(ck, function), []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) - 1 == call:
            raise Killed(stage)
        return original(*a, **k)

    monkeypatch.setattr(ck, function, dies)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 4, state={"data": {"epoch": 0, "batch": 4}}, **kw)
    monkeypatch.setattr(ck, function, original)

    renamed = function == "_prune"
    assert latest_checkpoint(tmp_path) == (step_dir(tmp_path, 4) if renamed else previous)
    assert verify_checkpoint(previous) is None  # intact, and not pruned by the dying save
    fresh = _setup(seed=1)
    state = load_checkpoint(latest_checkpoint(tmp_path), models={"net": fresh[0]}, optimizers={"net": fresh[1]})
    assert state["step"] == (4 if renamed else 2)

    # the next save (a resumed run reaching step 4 again) works and cleans up after the dead one
    folder = save_checkpoint(tmp_path, 4, state={"data": {"epoch": 0, "batch": 4}}, **kw)
    assert latest_checkpoint(tmp_path) == folder and verify_checkpoint(folder) is None
    assert sorted(p.name for p in ck.checkpoint_root(tmp_path).iterdir()) == ["step-0000004"]
    saved = load_checkpoint(folder, models={"net": fresh[0]})
    assert saved["step"] == 4 and all(torch.equal(a, b) for a, b in zip(fresh[0].parameters(), model.parameters()))
