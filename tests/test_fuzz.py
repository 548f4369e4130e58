"""Fuzzing ldm-txt2img as a red team would: mutated model folders (random JSON values, truncations,
garbage, lying headers, links, special files, missing files) and random command lines.

The rule for every example: the command succeeds (and wrote its PNGs), or it exits with status 2
and one line on stderr; within a time limit; and nothing is written outside its output folder.

The fast suite runs a fixed, small set of examples (derandomized, so CI is repeatable). A longer,
random run, e.g. nightly:
    LDM_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py -p no:cacheprovider
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from helpers import time_limit

from ldm.cli.txt2img import main as txt2img

EXAMPLES = int(os.environ.get("LDM_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 20,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIME_LIMIT = 60  # seconds per example: a hang fails the test instead of stalling the suite

JSON_FILES = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
]
WEIGHTS = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
FILES = JSON_FILES + WEIGHTS + ["tokenizer/tokenizer.json"]
SPECIAL = ["fifo", "dangling link", "link to a folder", "folder", "link loop", "link to /dev/zero", "empty"]

json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-5, 10**6), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
mutations = st.one_of(
    st.tuples(st.just("json"), st.sampled_from(JSON_FILES), st.integers(0, 200), json_values),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 0.999)),
    st.tuples(st.just("garbage"), st.sampled_from(FILES), st.binary(max_size=64)),
    st.tuples(
        st.just("header"),
        st.sampled_from(WEIGHTS),
        st.integers(0, 50),
        st.sampled_from(["shape", "dtype", "data_offsets"]),
        json_values,
    ),
    st.tuples(st.just("special"), st.sampled_from(FILES), st.sampled_from(SPECIAL)),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
)


def mutate(folder: Path, mutation: tuple) -> None:
    kind, name, *args = mutation
    path = folder / name
    if not path.is_file() or path.is_symlink():
        return  # an earlier mutation already replaced it
    if kind == "json":
        try:
            data = json.loads(path.read_text())
        except ValueError:  # an earlier mutation broke it already
            return
        if not isinstance(data, dict) or not data:
            return
        keys = sorted(data)
        data[keys[args[0] % len(keys)]] = args[1]
        path.write_text(json.dumps(data))
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * args[0])])
    elif kind == "garbage":
        path.write_bytes(args[0])
    elif kind == "header":
        data = path.read_bytes()
        try:
            n = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8 : 8 + n])
            names = sorted(k for k in header if k != "__metadata__")
        except (struct.error, ValueError, TypeError):  # an earlier mutation broke it already
            return
        if not names or not isinstance(header[names[args[0] % len(names)]], dict):
            return
        header[names[args[0] % len(names)]][args[1]] = args[2]
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    elif kind == "delete":
        path.unlink()
    else:
        path.unlink()
        special = args[0]
        if special == "fifo":
            os.mkfifo(path)
        elif special == "dangling link":
            path.symlink_to(folder / "nowhere")
        elif special == "link to a folder":
            path.symlink_to(folder)
        elif special == "folder":
            path.mkdir()
        elif special == "link loop":
            path.symlink_to(path)
        elif special == "link to /dev/zero":
            path.symlink_to("/dev/zero")
        else:
            path.write_bytes(b"")


def snapshot(root: Path, skip: Path) -> dict:
    """Every path under `root` (outside `skip`) with its size and modification time, links unfollowed."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path != skip:
                st_ = os.lstat(path)
                seen[str(path)] = (st_.st_size, st_.st_mtime_ns, st_.st_mode)
    return seen


def run_and_check(argv: list[str], root: Path, outdir: Path, capsys, monkeypatch) -> None:
    """The rule: success with PNGs, or exit 2 and one line; in time; nothing written outside `outdir`."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HOME", str(root / "hf"))  # a cache write would show in the snapshot
    before = snapshot(root, outdir)
    with time_limit(TIME_LIMIT):
        try:
            code = txt2img(argv)
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    event(f"exit {code}")  # the outcome mix, shown by --hypothesis-show-statistics
    assert snapshot(root, outdir) == before, "files were written outside the output folder"
    if code == 0:
        pngs = [line for line in out.splitlines() if line.endswith(".png")]
        assert pngs and all(Path(p).is_file() and outdir in Path(p).parents for p in pngs), out
    else:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert (
            code == 2 and len(lines) == 1 and "Traceback" not in err and lines[0].startswith("ldm-txt2img: error: ")
        ), (code, err)


@FUZZ
@given(changes=st.lists(mutations, min_size=1, max_size=3))
def test_fuzzed_model_folders_load_or_fail_with_one_line(tiny_pipeline_dir, capsys, monkeypatch, changes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = Path(shutil.copytree(tiny_pipeline_dir, root / "model"))
        for change in changes:
            mutate(folder, change)
        outdir = root / "out"
        run_and_check(
            ["a red circle", "--model", str(folder), "--steps", "2", "--outdir", str(outdir), "--quiet", "--seed", "0"],
            root,
            outdir,
            capsys,
            monkeypatch,
        )


# Values a valid run could take long with are left out (a 3000-step run is refused: 1000 training
# steps; 3000 px is not a multiple of 8; 10**12 images do not fit the disk).
INTS = ["-1", "0", "1", "2", "7", "8", "16", "64", "3001", str(10**12), "x", "", "1.5"]
COUNTS = ["-1", "0", "1", "2", str(10**12), "x", "", "1.5"]
FLOATS = ["nan", "inf", "-inf", "1e309", "-1", "0", "0.5", "1", "2", "7.5", "abc", ""]
FLAGS = {
    "--steps": INTS + ["3000"],
    "--height": INTS,
    "--width": INTS,
    "--num-images": COUNTS,
    "--batch-size": COUNTS,
    "--seed": INTS + [str(2**64)],
    "--cfg": FLOATS,
    "--guidance-rescale": FLOATS,
    "--eta": FLOATS,
    "--dynamic-threshold": FLOATS,
    "--threshold-bound": FLOATS,
    "--sampler": ["ddim", "euler", "heun", "plms", "dpm++2m_karras", "Euler a", "", "unipc"],
    "--dtype": ["auto", "fp32", "fp16", "bf16", "fp8"],
    "--device": ["cpu", "cuda", "cuda:7", "tpu", "auto", ""],
    "--vae-tiling": ["on", "off", "auto", "maybe"],
    "--attention": ["sdpa", "xformers", "flash"],
    "--negative": ["", "blurry", "a" * 300],
    "--prompts-file": ["/dev/null", "/dev/zero", "nowhere.txt", "."],
    "--model": ["nowhere", ".", "/dev/null", "x.ckpt", "org/name"],
    "--config": ["nowhere"],
    "--compile": None,
    "--allow-pickle": None,
    "--quiet": None,
    "--bogus": None,
}
arguments = st.lists(
    st.sampled_from(sorted(FLAGS)).flatmap(
        lambda flag: (
            st.just([flag]) if FLAGS[flag] is None else st.sampled_from(FLAGS[flag]).map(lambda value: [flag, value])
        )
    ),
    max_size=5,
)


@FUZZ
@given(args=arguments, prompt=st.sampled_from([[], ["a red circle"], [""], ["x" * 2000], ["--"]]))
def test_fuzzed_command_lines_run_or_fail_with_one_line(tiny_pipeline_dir, capsys, monkeypatch, args, prompt):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outdir = root / "out"
        flat = [x for pair in args for x in pair]
        if "--model" not in flat:
            flat += ["--model", str(tiny_pipeline_dir)]
        if "--compile" in flat:  # compiling costs ~a minute: keep the flag's validation, not the compilation
            flat.remove("--compile")
        run_and_check([*prompt, *flat, "--outdir", str(outdir)], root, outdir, capsys, monkeypatch)
