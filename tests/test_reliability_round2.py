"""Reliability, round 2: the classes a red team found past round 1, one test (or more) per class.
Each test fails without its fix: a pickle reached through a shard index, a FIFO that hangs, lying
headers and configs, requests that cannot fit, a full disk during a save, validation after work."""

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from helpers import time_limit
from unet_fixtures import make_shapes_data, make_vae_dir, write_config

import ldm.train.checkpoint as checkpoint_module
import ldm.train.unet as unet_module
from ldm import LatentPipeline
from ldm.cli.train_unet import main as train_unet
from ldm.cli.txt2img import main as txt2img
from ldm.models import check_safetensors
from ldm.train.checkpoint import latest_checkpoint, step_dir, verify_checkpoint

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def one_line_error(main, argv, capsys, seconds: int = 60) -> str:
    with time_limit(seconds), pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture()
def copy(tiny_pipeline_dir, tmp_path):
    return shutil.copytree(tiny_pipeline_dir, tmp_path / "pipeline")


@pytest.fixture()
def no_torch_load(monkeypatch):
    """Any unpickling of weights fails the test."""

    def refuse(*a, **k):
        raise AssertionError(f"torch.load was called on {a[0] if a else k}")

    monkeypatch.setattr(torch, "load", refuse)


def txt2img_args(model, tmp_path, *extra):
    return ["a red circle", "--model", str(model), "--steps", "1", "--outdir", str(tmp_path / "png"), "--quiet", *extra]


# ---- 1. pickles reached through a shard index ------------------------------------------------------


def shard_index_to(folder, component, stem, shard_name, write_shard=True):
    """Replace a component's single weights file by an index whose weight_map points at `shard_name`."""
    single = folder / component / f"{stem}.safetensors"
    state = load_file(single)
    single.unlink()
    if write_shard:
        torch.save(state, folder / component / "shard.bin")
    index = {"metadata": {}, "weight_map": {k: shard_name for k in state}}
    (folder / component / f"{stem}.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("component, stem", [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_a_shard_index_naming_pickles_is_refused_and_nothing_is_unpickled(copy, no_torch_load, component, stem):
    shard_index_to(copy, component, stem, "shard.bin")
    with pytest.raises(
        ValueError, match=r"names the shard 'shard.bin', which is not a safetensors file; pickle shards are refused"
    ):
        LatentPipeline.from_pretrained(copy, device="cpu")


def test_a_shard_index_cannot_reach_outside_its_folder(copy, tmp_path):
    shutil.copy(copy / UNET_WEIGHTS, tmp_path / "outside.safetensors")
    shard_index_to(copy, "unet", "diffusion_pytorch_model", "../../outside.safetensors", write_shard=False)
    with pytest.raises(ValueError, match="is not a file name in the component folder"):
        LatentPipeline.from_pretrained(copy, device="cpu")


def test_sharded_safetensors_still_load_and_the_training_loaders_check_shards_too(copy, no_torch_load):
    single = copy / UNET_WEIGHTS
    state = load_file(single)
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, copy / "unet" / "part-1.safetensors")
    save_file({k: state[k] for k in names[1::2]}, copy / "unet" / "part-2.safetensors")
    single.unlink()
    index = {"metadata": {}, "weight_map": {k: f"part-{1 + i % 2}.safetensors" for i, k in enumerate(names)}}
    (copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    pipe = LatentPipeline.from_pretrained(copy, device="cpu")
    assert all(torch.equal(pipe.unet.state_dict()[k], state[k]) for k in names)

    shard_index_to(copy, "vae", "diffusion_pytorch_model", "shard.bin")  # the stage-2 loader of a frozen VAE
    with pytest.raises(ValueError, match="pickle shards are refused"):
        unet_module.load_vae(copy)


# ---- 2. files that are not files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, what",
    [
        (UNET_WEIGHTS, "a FIFO (named pipe)"),
        ("vae/config.json", "a FIFO (named pipe)"),
        ("tokenizer/tokenizer.json", "a FIFO (named pipe)"),
        ("scheduler/scheduler_config.json", "a FIFO (named pipe)"),
        ("text_encoder/model.safetensors", "a character device"),
        ("unet/config.json", "a broken symbolic link"),
    ],
)
def test_anything_but_a_regular_file_is_named_at_once_never_waited_on(copy, tmp_path, capsys, name, what):
    path = copy / name
    path.unlink()
    if what.startswith("a FIFO"):
        os.mkfifo(path)
    elif what == "a character device":
        path.symlink_to("/dev/zero")
    else:
        path.symlink_to(tmp_path / "nowhere")
    err = one_line_error(txt2img, txt2img_args(copy, tmp_path), capsys, seconds=30)
    assert f"{path}: {what}, not a regular file" in err


def test_a_fifo_among_a_components_other_files_is_refused_too(copy, tmp_path, capsys):
    os.mkfifo(copy / "unet" / "notes.txt")  # loaders list folders: every entry counts, not only the expected names
    assert "notes.txt: a FIFO (named pipe), not a regular file" in one_line_error(
        txt2img, txt2img_args(copy, tmp_path), capsys, 30
    )


# ---- 3. headers and configs that lie; non-finite weights ---------------------------------------------


def rewrite_header(path, edit):
    """Apply `edit` to a safetensors file's JSON header, keeping the tensor bytes."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def first_tensor(header):
    return sorted(k for k in header if k != "__metadata__")[0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda h: h[first_tensor(h)].update(
                shape=[h[first_tensor(h)]["shape"][0] * 2] + h[first_tensor(h)]["shape"][1:]
            ),
            "bytes, but the header gives it",
        ),
        (lambda h: h[first_tensor(h)].update(dtype="F64"), "bytes, but the header gives it"),
        (lambda h: h[first_tensor(h)].update(dtype="Q99"), "has an unknown dtype 'Q99'"),
        (lambda h: h[first_tensor(h)].update(shape=[-4, 8]), "has a malformed shape"),
    ],
)
def test_a_header_that_lies_about_a_tensor_is_named_before_loading(copy, edit, message):
    rewrite_header(copy / UNET_WEIGHTS, edit)
    with pytest.raises(ValueError, match=message) as info:
        LatentPipeline.from_pretrained(copy, device="cpu")
    assert str(copy / UNET_WEIGHTS) in str(info.value)


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, path)
    rewrite_header(path, lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"]))
    with pytest.raises(ValueError, match="a gap or an overlap"):
        check_safetensors(path)


CONFIG_CASES = {
    "negative channels": (
        "unet/config.json",
        "block_out_channels",
        [-32, 64],
        "block_out_channels = [-32, 64]: expected a list",
    ),
    "channels of the wrong type": ("vae/config.json", "block_out_channels", "wide", "block_out_channels = 'wide'"),
    "absurd depth": (
        "unet/config.json",
        "layers_per_block",
        10**9,
        "layers_per_block = 1000000000: expected a whole number",
    ),
    "sample size text": ("unet/config.json", "sample_size", "big", "sample_size = 'big'"),
    "zero latent scale": ("vae/config.json", "scaling_factor", 0, "scaling_factor = 0: expected a finite number in (0"),
    "encoder width text": ("text_encoder/config.json", "hidden_size", "x", "hidden_size = 'x'"),
    "encoder depth absurd": ("text_encoder/config.json", "num_hidden_layers", 10**6, "num_hidden_layers = 1000000"),
    "negative timesteps": ("scheduler/scheduler_config.json", "num_train_timesteps", -5, "num_train_timesteps = -5"),
    "betas reversed": ("scheduler/scheduler_config.json", "beta_start", 0.5, "beta_start 0.5 must be below beta_end"),
    "block lists disagree": (
        "unet/config.json",
        "down_block_types",
        ["DownBlock2D"],
        "down_block_types has 1 entries but block_out_channels has 2",
    ),
    "config disagrees with weights": ("unet/config.json", "cross_attention_dim", 48, "but unet/config.json builds"),
    "config builds more than the weights hold": (
        "unet/config.json",
        "transformer_layers_per_block",
        2,
        "parameter(s) the weights do not hold",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_config_value_that_cannot_be_built_names_the_file_and_key(copy, tmp_path, capsys, case):
    name, key, value, message = CONFIG_CASES[case]
    config = json.loads((copy / name).read_text())
    config[key] = value
    (copy / name).write_text(json.dumps(config))
    err = one_line_error(txt2img, txt2img_args(copy, tmp_path), capsys)
    assert message.replace("unet/config.json", str(copy / "unet" / "config.json")) in err and (
        name.split("/")[0] in err
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_found_at_load_with_the_tensor_named(copy, value):
    path = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    name = sorted(state)[3]
    state[name].view(-1)[0] = value
    save_file(state, path)
    with pytest.raises(ValueError, match=rf"{path}: tensor {name} holds non-finite values"):
        LatentPipeline.from_pretrained(copy, device="cpu")


# ---- 4. requests that cannot fit ----------------------------------------------------------------------


@pytest.fixture()
def no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(LatentPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(unet_module, "load_vae", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--height", "1000000", "--width", "1000000"],
            r"a batch of 1 image\(s\) of 1000000x1000000 \(VAE tiling on\) needs ~[\d,.]+ GB of memory "
            r"\(weights .*, U-Net .*, VAE decode .*, images .*\), but only .* is",
        ),
        (
            ["--height", "4096", "--width", "4096", "--vae-tiling", "off", "--batch-size", "64", "--num-images", "64"],
            r"a batch of 64 image\(s\) of 4096x4096 \(VAE tiling off\) needs .*or --batch-size, or --vae-tiling on",
        ),
        (
            ["--num-images", str(10**12)],
            r"1,000,000,000,000 image\(s\) of 64x64 need at least ~[\d,]+ MB in --outdir .* MB free",
        ),
    ],
)
def test_a_request_that_cannot_fit_is_refused_up_front_with_the_estimate(
    tiny_pipeline_dir, tmp_path, no_weights, capsys, extra, message
):
    import re

    assert re.search(message, one_line_error(txt2img, txt2img_args(tiny_pipeline_dir, tmp_path, *extra), capsys))


def test_a_prompts_file_that_never_ends_is_read_with_a_limit(tiny_pipeline_dir, tmp_path, no_weights, capsys):
    err = one_line_error(
        txt2img,
        ["--prompts-file", "/dev/zero", "--model", str(tiny_pipeline_dir), "--outdir", str(tmp_path)],
        capsys,
        30,
    )
    assert "prompts file /dev/zero is longer than 16 MB" in err


def test_the_python_api_refuses_before_any_work(tiny_pipe, monkeypatch):
    monkeypatch.setattr(
        tiny_pipe, "encode_prompts", lambda *a: pytest.fail("work began before the request was checked")
    )
    with pytest.raises(ValueError, match=r"needs ~.* of memory .*; use a smaller height/width \(LDM"):
        tiny_pipe("a red circle", height=2**20, width=2**20, progress=False)


def test_the_estimate_is_small_for_small_requests_and_grows_with_the_pixels(tiny_pipeline_dir):
    from ldm.budget import estimate
    from ldm.models import inspect_pipeline

    info = inspect_pipeline(tiny_pipeline_dir)
    small = estimate(info.unet_config, info.vae_config, 64, 64, 1, 4)
    large = estimate(info.unet_config, info.vae_config, 1024, 1024, 1, 4)
    assert small.total < 2**30  # what the tests themselves generate fits any machine
    assert 100 < (large.unet - small.unet) / (small.unet - 64 * 2**20) < 400  # 256x the pixels


# ---- 5. a full disk ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    return {
        "vae": make_vae_dir(root / "vae"),
        "data": make_shapes_data(root / "data", 16),
        "config": write_config(root / "c.yaml"),
    }


def train_args(setup, out, *extra):
    return [
        "--config",
        str(setup["config"]),
        "--vae",
        str(setup["vae"]),
        "--data",
        str(setup["data"]),
        "--output-dir",
        str(out),
        *extra,
    ]


def test_a_full_disk_during_a_checkpoint_exits_74_with_one_line_and_the_run_resumes(
    training, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_save_file, calls = checkpoint_module.save_file, []

    def disk_fills_at_the_second_checkpoint(tensors, path, *a, **k):
        calls.append(path)
        if "step-0000004" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_fills_at_the_second_checkpoint)
    code = train_unet(train_args(training, out, "--max-steps", "6", "run.checkpoint_every=2", "run.sample_every=0"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 74
    assert (
        err.startswith("ldm-train-unet: no space left on device: the checkpoint of step 4 needs ~")
        and str(step_dir(out, 2)) in err
    )
    assert (
        sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
        and verify_checkpoint(step_dir(out, 2)) is None
    )
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)  # space freed
    assert (
        train_unet(
            train_args(
                training, out, "--max-steps", "6", "run.checkpoint_every=2", "run.sample_every=0", "--resume", "latest"
            )
        )
        == 0
    )
    assert latest_checkpoint(out) == step_dir(out, 6) and (out / "final" / "model_index.json").is_file()


def test_a_full_disk_while_writing_a_png_leaves_no_partial_file(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    real_save = Image.Image.save

    def half_then_full(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        fp.truncate(fp.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    assert txt2img(txt2img_args(tiny_pipeline_dir, tmp_path)) == 74
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("ldm-txt2img: error: no space left on device writing ")
        and "MB free in" in err
        and "\n" not in err
    )
    assert list((tmp_path / "png").iterdir()) == []


# ---- 6. validation before work ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "config key optim.lr: expected a finite number, got 'nan'"),
        ("optim.lr=.inf", "config key optim.lr: expected a finite number, got inf"),
        ("optim.lr=0", "config key optim.lr must be > 0, got 0.0"),
        ("optim.betas=[1.5, 0.9]", "config key optim.betas must be two numbers in [0, 1), got [1.5, 0.9]"),
        ("ema.decay=2", "config key ema.decay must be in (0, 1], got 2.0"),
        ("optim.max_grad_norm=-1", "config key optim.max_grad_norm must be > 0"),
        ("data.num_workers=-1", "config key data.num_workers must be ≥ 0"),
    ],
)
def test_bad_optimizer_and_ema_values_are_refused_before_anything_is_built(
    training, tmp_path, no_weights, capsys, override, message
):
    assert message in one_line_error(train_unet, train_args(training, tmp_path / "out", override), capsys)
