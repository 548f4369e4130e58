"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a folder `OUTPUT/checkpoints/step-NNNNNNN/` holding
    model-NAME.safetensors                 weights of each trained network
    optimizer-NAME.safetensors / .json     optimizer state tensors / param groups and scalars
    scheduler-NAME.json                    LR scheduler state
    ema-NAME.safetensors / .json           EMA shadow weights / decay state
    scaler.json                            the fp16 grad scaler, when there is one
    rng-RANK.safetensors / .json           every process's torch, CUDA, numpy and Python RNG state
    state.json                             the loop's own state (step, data position, ...)
    manifest.json                          SHA-256 of every file above; written last
It is assembled in a hidden temporary folder and renamed into place once complete, so a crash
or a full disk during a save never damages the previous checkpoint; a folder without a valid
manifest is incomplete and `latest_checkpoint` passes over it, saying so. Old checkpoints are
deleted only after a newer one is complete, keeping the last `keep_last`.

Multi-process runs (accelerate, DDP) share one output folder on a shared filesystem: every
process writes its own RNG file, the main process writes the rest. Sharded training states
(FSDP, DeepSpeed ZeRO) are not supported by this format.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ldm.train.guards import EXIT_SAVE_FAILED, RunStopped

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{7,})$")
# A checkpoint being replaced by a re-save of its step is parked under this name for an instant;
# if the run dies right then, it is still the newest complete checkpoint of that step.
PARKED_DIR = re.compile(r"^\.old-step-(\d{7,})$")
log = logging.getLogger("ldm.train")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:07d}"


# ---- flattening state dicts into tensors + JSON -------------------------------------------------


def _split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by {"__tensor__": key}, collecting it in `tensors`."""
    if torch.is_tensor(state):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        if not all(isinstance(k, (str, int)) for k in state):
            raise TypeError(f"cannot store a dict with keys of type {[type(k).__name__ for k in state]}")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by param index).
        return {"__dict__": [[k, _split_state(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        items = [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    if isinstance(state, np.generic):
        return state.item()
    raise TypeError(f"cannot store a value of type {type(state).__name__} at {prefix} without pickle")


def _join_state(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(meta, dict):
        if "__tensor__" in meta:
            return tensors[meta["__tensor__"]]
        if "__dict__" in meta:
            return {k: _join_state(v, tensors) for k, v in meta["__dict__"]}
        if "__tuple__" in meta:
            return tuple(_join_state(v, tensors) for v in meta["__tuple__"])
    if isinstance(meta, list):
        return [_join_state(v, tensors) for v in meta]
    return meta


def save_state(state: Any, folder: Path, name: str) -> None:
    """Write any nested dict/list of tensors and plain values as NAME.safetensors + NAME.json."""
    tensors: dict[str, torch.Tensor] = {}
    meta = _split_state(state, "t", tensors)
    # safetensors refuses tensors that share memory; an optimizer may share one tensor between its
    # parameters' states (bitsandbytes' 8-bit quantisation maps). Each gets its own copy on disk.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensors[key] = tensor.clone()
        seen.add(tensors[key].untyped_storage().data_ptr())
    if tensors:
        save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(meta))


def load_state(folder: Path, name: str) -> Any:
    meta = json.loads((folder / f"{name}.json").read_text())
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.exists() else {}
    return _join_state(meta, tensors)


# ---- RNG ---------------------------------------------------------------------------------------


def rng_state() -> dict:
    """The RNG states that decide a run's randomness: Python, NumPy, torch CPU, and every CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checksums and the manifest -------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(folder: Path) -> str | None:
    """None if `folder` is a complete, intact checkpoint; otherwise what is wrong with it."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under OUTPUT/checkpoints, skipping (and reporting) broken ones."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    steps = _checkpoint_folders(root)
    candidates = [steps[k] for k in sorted(steps, reverse=True)]
    for folder in candidates:
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def _checkpoint_folders(root: Path) -> dict[int, Path]:
    """step → folder of every checkpoint under `root`, newest parked copy included (see PARKED_DIR)."""
    steps = {int(m[1]): p for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))}
    for p in root.iterdir():
        if p.is_dir() and (m := PARKED_DIR.match(p.name)) and int(m[1]) not in steps:
            steps[int(m[1])] = p  # a re-save died between its two renames: the parked copy is the checkpoint
    return steps


def resolve_resume(resume: str | None, output_dir: str | Path, flag: str = "--resume") -> Path | None:
    """`latest` → the newest intact checkpoint (None if there is none yet); a folder → itself,
    checked. `flag` names the option in error messages."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag}: checkpoint folder not found: {folder}")
    problem = verify_checkpoint(folder)
    if problem:
        raise ValueError(f"{flag} {folder}: not a usable checkpoint: {problem}")
    return folder


# ---- save and load -------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    emas: dict[str, Any] | None = None,
    scaler: Any | None = None,
    state: dict | None = None,
    accelerator: Any | None = None,
    keep_last: int = 3,
    protect: Path | None = None,
    trained_only: bool = False,
) -> Path:
    """Write checkpoint `step` atomically; every process of a multi-process run must call it.

    `models` are unwrapped with `accelerator.unwrap_model` when one is given. `state` is the loop's
    own JSON-able state. `protect` is a checkpoint never deleted by keep-last pruning (the one the
    run resumed from, until a newer one exists). `trained_only`: each model file holds only the
    parameters that train (a LoRA's adapters), not the frozen base they sit on.
    """
    is_main = accelerator is None or accelerator.is_main_process
    rank = accelerator.process_index if accelerator is not None else 0
    final = step_dir(output_dir, step)
    tmp = final.parent / f".tmp-{final.name}"

    def write(work) -> None:
        """Do this process's part of the save, then learn whether every process managed its part
        (the collective is also the barrier between parts). A failure anywhere (a full disk, a
        quota, an I/O error) removes the partial folder and raises SaveFailed on every process:
        the previous checkpoint stays as it was, and no process waits forever for another."""
        error, code = None, 0
        try:
            work()
        except (OSError, SafetensorError) as e:
            error, code = e, io_error_code(e)
            if code is None:  # not an I/O failure: a bug, shown as one
                raise
        code = _max_over_processes(accelerator, code)
        if code:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            states = [m.state_dict() for m in models.values()] + [o.state_dict() for o in (optimizers or {}).values()]
            needed = _state_nbytes(states + [e.state_dict() for e in (emas or {}).values()] + [rng_state()])
            raise SaveFailed(step, final.parent, code, needed, latest_checkpoint(output_dir), error)

    def prepare():
        root = final.parent
        if root.is_dir():  # leftovers of saves that were killed: one run writes one folder at a time
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for parked in root.glob(".old-step-*"):
                m = PARKED_DIR.match(parked.name)
                if m and (root / f"step-{m[1]}").is_dir():
                    shutil.rmtree(parked, ignore_errors=True)  # its re-save completed; else keep it (see latest_checkpoint)
        tmp.mkdir(parents=True)

    def write_main():
        unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: m)
        for name, model in models.items():
            if trained_only:
                weights = {k: p.detach().cpu().contiguous() for k, p in unwrap(model).named_parameters()
                           if p.requires_grad}
                save_file(weights, str(tmp / f"model-{name}.safetensors"))
            else:
                save_model(unwrap(model), str(tmp / f"model-{name}.safetensors"))
        for name, optimizer in (optimizers or {}).items():
            save_state(optimizer.state_dict(), tmp, f"optimizer-{name}")
        for name, scheduler in (schedulers or {}).items():
            save_state(scheduler.state_dict(), tmp, f"scheduler-{name}")
        for name, ema in (emas or {}).items():
            save_state(ema.state_dict(), tmp, f"ema-{name}")
        if scaler is not None:
            save_state(scaler.state_dict(), tmp, "scaler")
        num_processes = accelerator.num_processes if accelerator is not None else 1
        (tmp / "state.json").write_text(json.dumps({"step": step, "num_processes": num_processes, **(state or {})}, indent=1))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run re-reaching it): replace whole
            old = final.parent / f".old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _prune(output_dir, keep_last, keep={final, protect})

    write(prepare if is_main else lambda: None)
    write(lambda: save_state(rng_state(), tmp, f"rng-{rank}"))
    write(write_main if is_main else lambda: None)
    return final


class SaveFailed(RunStopped):
    """A checkpoint could not be written (no space left, a quota, an I/O error). Its partial folder
    is removed; the previous checkpoint is intact. Exit status 74 (sysexits.h EX_IOERR)."""

    exit_status = EXIT_SAVE_FAILED

    def __init__(self, step: int, folder: Path, errno_code: int, needed: int, checkpoint: Path | None,
                 error: Exception | None):
        self.step, self.folder, self.needed, self.checkpoint = step, folder, needed, checkpoint
        try:
            free = f"{shutil.disk_usage(folder if folder.is_dir() else folder.parent).free / 2**20:,.0f} MB free"
        except OSError:
            free = "free space unknown"
        if errno_code in (errno.ENOSPC, errno.EDQUOT):
            what = (f"no space left on device: the checkpoint of step {step} needs ~{needed / 2**20:,.0f} MB "
                    f"in {folder} ({free})")
        elif error is not None:
            what = f"cannot write the checkpoint of step {step} in {folder}: {os.strerror(errno_code)}"
        else:
            what = (f"another process could not write its part of the checkpoint of step {step} in {folder} "
                    f"({os.strerror(errno_code)})")
        last = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no complete checkpoint exists yet"
        super().__init__(f"{what}; the partial checkpoint was removed and {last}; "
                         "free space, then rerun with --resume latest")


def io_error_code(error: BaseException) -> int | None:
    """The errno of an I/O failure, from an OSError or from the safetensors library (which reports
    a full disk as `SafetensorError: ... I/O error: No space left on device (os error 28)`); None
    for any other error."""
    if isinstance(error, OSError):
        return error.errno or errno.EIO
    if isinstance(error, SafetensorError) and "I/O error" in str(error):
        found = re.search(r"os error (\d+)", str(error))
        return int(found[1]) if found else errno.EIO
    return None


def _max_over_processes(accelerator, value: int) -> int:
    """The largest of `value` over the processes of a distributed run (`value` alone otherwise)."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _state_nbytes(state: Any) -> int:
    """The bytes of the tensors in a nested state: about what a checkpoint of it takes on disk."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_nbytes(v) for v in state)
    return 0


def load_model_weights(folder: Path, name: str, model: torch.nn.Module, trained_only: bool = False) -> None:
    """Load a checkpoint's `model-NAME.safetensors` into `model`, which must fit it exactly (with
    `trained_only`: every parameter that trains, and nothing else)."""
    if trained_only:
        state = load_file(Path(folder) / f"model-{name}.safetensors")
        wanted = {k for k, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = wanted - set(state), set(state) - wanted
        if not missing and not unexpected:
            try:
                model.load_state_dict(state, strict=False)
            except RuntimeError as e:  # a rank or a target of another run: shapes that differ
                raise ValueError(f"checkpoint {folder}: model-{name} does not fit this model "
                                 f"({' '.join(str(e).split())[:200]})") from None
            return
    else:
        missing, unexpected = load_model(model, str(Path(folder) / f"model-{name}.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder}: model-{name} does not fit this model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def load_checkpoint(
    folder: str | Path,
    *,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    emas: dict[str, Any] | None = None,
    scaler: Any | None = None,
    accelerator: Any | None = None,
    trained_only: bool = False,
) -> dict:
    """Restore everything `save_checkpoint` wrote, in place; returns the loop's `state` dict.
    (`trained_only` as there: the model files hold only the parameters that train.)

    Each process restores its own RNG state, so the run continues exactly as if never stopped.
    """
    folder = Path(folder)
    problem = verify_checkpoint(folder)
    if problem:
        raise ValueError(f"checkpoint {folder} is not usable: {problem}")
    state = json.loads((folder / "state.json").read_text())
    num_processes = accelerator.num_processes if accelerator is not None else 1
    if state.get("num_processes", 1) != num_processes:
        raise ValueError(f"checkpoint {folder} was written by {state['num_processes']} processes; resume it with the same number (this run has {num_processes})")
    unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: m)
    for name, model in models.items():
        load_model_weights(folder, name, unwrap(model), trained_only)
    for name, optimizer in (optimizers or {}).items():
        optimizer.load_state_dict(load_state(folder, f"optimizer-{name}"))
    for name, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(load_state(folder, f"scheduler-{name}"))
    for name, ema in (emas or {}).items():
        ema.load_state_dict(load_state(folder, f"ema-{name}"))
    if scaler is not None and (folder / "scaler.json").exists():
        scaler.load_state_dict(load_state(folder, "scaler"))
    rank = accelerator.process_index if accelerator is not None else 0
    set_rng_state(load_state(folder, f"rng-{rank}"))
    return state


def _prune(output_dir: str | Path, keep_last: int, keep: set) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, never one in `keep`."""
    if keep_last <= 0:
        return
    steps = _checkpoint_folders(checkpoint_root(output_dir))
    for folder in [steps[k] for k in sorted(steps, reverse=True)][keep_last:]:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Flush the files of `folder` to disk before the rename makes them the checkpoint."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
