"""Shipped assets are found from a checkout and packed into a wheel."""

import fnmatch
import tomllib
from pathlib import Path

from ldm.assets import asset_path

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_finds_its_assets():
    assert asset_path("clip-tokenizer") == ROOT / "assets" / "clip-tokenizer"
    assert (asset_path("clip-tokenizer") / "vocab.json").is_file()
    assert asset_path("no-such-asset") == ROOT / "assets" / "no-such-asset"  # where an error message should point


def test_every_asset_file_is_package_data_of_the_wheel():
    """pyproject maps assets/ onto the ldm._assets package: each file must match a package-data glob
    (setuptools' globs are relative to the package folder; '*' does not cross '/')."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["ldm._assets"] == "assets" and "ldm._assets" in tool["packages"]
    globs = tool["package-data"]["ldm._assets"]
    files = [f.relative_to(ROOT / "assets").as_posix() for f in (ROOT / "assets").rglob("*") if f.is_file()]
    assert files
    depth_ok = {f: any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs) for f in files}
    assert all(depth_ok.values()), [f for f, ok in depth_ok.items() if not ok]
    # the default model's layout (model_index.json, README.md at depth 1; unet/config.json at depth 2) is covered too
    for f in ("default-model/model_index.json", "default-model/unet/diffusion_pytorch_model.safetensors"):
        assert any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs), f
