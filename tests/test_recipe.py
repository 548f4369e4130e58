"""README's training commands are the default model's recipe at small scale (its model card's)."""

import re
import shlex
from pathlib import Path

from ldm.config import load_config
from ldm.train.unet import UNetTrainConfig

ROOT = Path(__file__).parent.parent
MACHINE_OR_PATHS = ("cache.dir", "run.mixed_precision")  # where files go, and what this CPU can do


def script_words(name: str) -> list[str]:
    """The words of scripts/build_default_model.sh's bash array `name=( ... )`."""
    text = (ROOT / "scripts" / "build_default_model.sh").read_text()
    body = re.search(rf"^{name}=\((.*?)\)$", text, re.S | re.M).group(1)
    return shlex.split(body.replace("\\\n", " "))


def test_the_readme_data_command_is_the_default_models():
    readme = (ROOT / "README.md").read_text()
    train_block = readme[readme.index("## Train your own model") :]
    make = next(line for line in train_block.splitlines() if line.startswith("ldm-shapes make"))
    script = (ROOT / "scripts" / "build_default_model.sh").read_text()
    first = next(line for line in script.splitlines() if "ldm-shapes make" in line and not line.startswith("#"))
    for flag in ("--size", "--unnamed-background", "--seed"):
        ours, theirs = shlex.split(make), shlex.split(first[first.index("ldm-shapes make") :])
        assert ours[ours.index(flag) + 1] == theirs[theirs.index(flag) + 1], flag


def test_the_preset_is_the_default_models_first_run():
    words = script_words("U")
    assert words[words.index("--config") + 1] == "configs/unet/shapes.yaml"
    config = load_config(UNetTrainConfig, ROOT / "configs" / "unet" / "shapes.yaml")
    overrides = [w for w in words if "=" in w and not w.startswith("--") and not w.startswith(MACHINE_OR_PATHS)]
    assert overrides == [], f"the recipe changes the preset with {overrides}: put them in configs/unet/shapes.yaml"
    assert config.text_encoder.architecture == "bert" and config.run.max_steps == 16000
    text = (ROOT / "configs" / "unet" / "shapes.yaml").read_text()
    assert "in progress" not in text
