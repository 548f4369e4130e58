import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random ε-prediction SD-style pipeline, written by diffusers itself."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="session")
def tiny_v_pipeline_dir(tmp_path_factory) -> Path:
    """The same, predicting v (as SD 2.x does)."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_v") / "pipeline", seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    from ldm import LatentPipeline

    return LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu")


def pytest_configure(config):
    """One torch thread per pytest-xdist worker: two workers × two threads on two cores spin and
    wait on each other (several times slower than one thread each)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
