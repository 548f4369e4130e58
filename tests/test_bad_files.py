"""Loaders under bad files: every one is a ValueError naming the file, never a hang or a crash."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm import LatentPipeline
from ldm.models import check_safetensors, inspect_pipeline

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture()
def copy(tiny_pipeline_dir, tmp_path):
    target = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, target)
    return target


def _damage(path, data: bytes):
    path.write_bytes(data)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3964928\n", "git-lfs pointer file"),
        (lambda b: b[: len(b) // 2], "truncated safetensors file"),
        (lambda b: b"\x00" * 5, "truncated safetensors file"),
        (lambda b: (10**12).to_bytes(8, "little") + b"{}", "not a valid safetensors file"),
        (lambda b: (20).to_bytes(8, "little") + b"\xff" * 20 + b"x" * 100, "unreadable header"),
        (lambda b: (2).to_bytes(8, "little") + b"[]" + b"x" * 100, "header is not a JSON object"),
        (lambda b: (30).to_bytes(8, "little") + b'{"w": {"data_offsets": "xy"}} ' + b"x" * 100, "malformed entry for 'w'"),
    ],
)
def test_damaged_weights_are_named_before_loading(copy, make, message):
    path = copy / WEIGHTS
    _damage(path, make(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        LatentPipeline.from_pretrained(copy, device="cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json"])
def test_broken_json_configs_name_the_file(copy, name):
    (copy / name).write_text('{"block_out_channels": [32,')
    with pytest.raises(ValueError, match="not a readable JSON file") as info:
        inspect_pipeline(copy)
    assert name.split("/")[-1] in str(info.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzzed_safetensors_headers_raise_value_error_or_pass(tmp_path_factory, data):
    """Any bytes: a ValueError (or acceptance of a genuinely valid file), never another exception."""
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(data)
    try:
        check_safetensors(path)
    except ValueError as e:
        assert str(path) in str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.dictionaries(st.text(max_size=4), st.one_of(st.none(), st.integers(), st.dictionaries(st.just("data_offsets"), st.lists(st.one_of(st.integers(-5, 10**6), st.text(max_size=2)), max_size=3)))))
def test_fuzzed_json_headers_raise_value_error_or_pass(tmp_path_factory, entries):
    header = json.dumps(entries).encode()
    path = tmp_path_factory.mktemp("fuzzj") / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    try:
        check_safetensors(path)
    except ValueError as e:
        assert str(path) in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=3)), max_size=4))
def test_fuzzed_model_index_is_refused_cleanly(tiny_pipeline_dir, tmp_path_factory, header):
    folder = tmp_path_factory.mktemp("idx")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / part).mkdir()
    (folder / "model_index.json").write_text(json.dumps(header))
    with pytest.raises(ValueError):
        inspect_pipeline(folder)
