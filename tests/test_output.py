"""What a command prints: its results, our progress bars and our warnings, one line each; other
libraries' chatter only with --verbose; no Hub lookup when bitsandbytes is imported."""

import subprocess
import sys

CHATTER = (
    "Loading weights",
    "Writing model shards",
    "[transformers]",
    "Token indices sequence length",
    "gemm_4bit",
    "FutureWarning",
    "UserWarning",
    "DeprecationWarning",
    "kernels-community",
    "Traceback",
)


def test_a_run_prints_only_our_warnings_and_bars(tmp_path):
    """The default model, a long prompt with words it never saw: stderr is our progress bar and
    our two warnings (truncation, unseen words), one line each, and nothing from the libraries."""
    prompt = "a corgi in a bowtie " + "and a red circle to the left of a blue square " * 2  # > 24 tokens
    result = subprocess.run(
        [sys.executable, "-m", "ldm.cli.txt2img", prompt, "--seed", "1", "--steps", "3", "--outdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith(("ldm-txt2img: warning: ", "denoising")) for line in lines), result.stderr
    warnings = [line for line in lines if line.startswith("ldm-txt2img: warning: ")]
    assert len(warnings) == 2 and "is longer than the text encoder's 24 tokens" in warnings[0], warnings
    assert (
        "'corgi', 'in', 'bowtie'" in warnings[1]
        and "the default model" in warnings[1]
        and "--model PATH" in warnings[1]
    )
    assert not any(noise in result.stderr for noise in CHATTER)


def test_verbose_leaves_the_libraries_as_they_are(monkeypatch):
    import ldm.quiet
    from ldm.cli.txt2img import build_parser

    calls = []
    monkeypatch.setattr(ldm.quiet, "quiet_libraries", lambda: calls.append(1))
    build_parser().parse_intermixed_args(["a red circle", "--verbose"])
    assert calls == []
    build_parser().parse_intermixed_args(["a red circle"])
    assert calls  # (parse_intermixed_args parses twice; quieting twice is harmless)


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
