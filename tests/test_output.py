"""What a command prints: its results, our progress bars and our warnings, one line each; other
libraries' chatter only with --verbose; no Hub lookup when bitsandbytes is imported."""

import subprocess
import sys

LONG = "a red circle to the left of a blue square and a green triangle above a yellow circle"  # > 16 tokens
CHATTER = ("Loading weights", "Writing model shards", "[transformers]", "Token indices sequence length", "gemm_4bit",
           "FutureWarning", "UserWarning", "DeprecationWarning", "kernels-community", "Traceback")


def txt2img(tiny_pipeline_dir, tmp_path, *extra):
    argv = [sys.executable, "-m", "ldm.cli.txt2img", LONG, "--model", str(tiny_pipeline_dir), "--steps", "2", "--seed", "1",
            "--outdir", str(tmp_path), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_stderr_holds_only_our_warnings_and_bars_unless_verbose(tiny_pipeline_dir, tmp_path):
    quiet = txt2img(tiny_pipeline_dir, tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    for line in quiet.stderr.replace("\r", "\n").splitlines():
        assert not line.strip() or line.startswith("ldm-txt2img: warning: ") or line.startswith("denoising"), line
    assert sum("is longer than the text encoder's" in line for line in quiet.stderr.splitlines()) == 1
    assert not any(noise in quiet.stderr for noise in CHATTER)

    verbose = txt2img(tiny_pipeline_dir, tmp_path / "b", "--verbose", "--quiet")
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr  # the libraries speak again


def test_importing_bitsandbytes_asks_the_hub_nothing():
    probe = """
import sys
import huggingface_hub.hf_api as hf_api
def lookup(*a, **k):
    print("HUB LOOKUP", flush=True)
    raise RuntimeError("offline")
hf_api.HfApi.get_organization_overview = lookup
from ldm.quiet import import_bitsandbytes_offline
import_bitsandbytes_offline()
import bitsandbytes, kernels  # kernels is importable again afterwards
print("imported", "bitsandbytes" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "imported True" in result.stdout, result.stderr
    assert "HUB LOOKUP" not in result.stdout and "gemm_4bit" not in result.stderr
