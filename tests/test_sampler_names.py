"""Sampler names as people type them: ours, AUTOMATIC1111's display names and aliases, any case;
a typo gets the closest names. One table (ldm.sampling.SAMPLERS) serves the CLI and the Python API."""

import re

import numpy as np
import pytest

from ldm.cli.txt2img import main as txt2img
from ldm.sampling import SAMPLERS, make_scheduler, resolve_sampler

# AUTOMATIC1111's samplers (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py) that
# diffusers also has, with what A1111 calls them → ours.
A1111 = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM2 Karras": "dpm2_karras",
    "DPM2 a": "dpm2_a",
    "DPM2 a Karras": "dpm2_a_karras",
    "DPM++ 2M": "dpm++2m",
    "DPM++ 2M Karras": "dpm++2m_karras",
    "DPM++ 2M SDE": "dpm++2m_sde",
    "DPM++ 2M SDE Karras": "dpm++2m_sde_karras",
    "DDIM": "ddim",
    "PLMS": "plms",
    "UniPC": "unipc",
    "k_euler_a": "euler_a",
    "k_lms": "lms",
    "k_dpmpp_2m_ka": "dpm++2m_karras",
    "k_dpm_2_a": "dpm2_a",
}


@pytest.mark.parametrize("typed, ours", sorted(A1111.items()))
def test_a1111_names_and_aliases_map_to_ours_in_any_case(typed, ours):
    for variant in (typed, typed.lower(), typed.upper(), f"  {typed} "):
        assert resolve_sampler(variant) == ours
    assert resolve_sampler(ours) == ours


def test_every_sampler_builds_from_an_sd_schedule():
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    for name, spec in SAMPLERS.items():
        scheduler = make_scheduler(name, config)
        assert type(scheduler).__name__ == spec.scheduler
        scheduler.set_timesteps(10)
        assert len(scheduler.timesteps) >= 10


@pytest.mark.parametrize("typo, suggested", [("eulr", "euler"), ("DPM++ 2M Karas", "dpm++2m_karras"), ("k_lsm", "lms")])
def test_a_typo_suggests_the_closest_names(typo, suggested):
    with pytest.raises(
        ValueError, match=rf"unknown sampler '{re.escape(typo)}'; did you mean {re.escape(suggested)}\b"
    ):
        resolve_sampler(typo)


def test_a_name_means_the_same_sampler_in_the_cli_and_the_api(tiny_pipe, tiny_pipeline_dir, tmp_path, capsys):
    ours = tiny_pipe(
        "a red circle", sampler="dpm++2m_karras", seed=3, num_inference_steps=4, output_type="np", progress=False
    )
    theirs = tiny_pipe(
        "a red circle", sampler="DPM++ 2M Karras", seed=3, num_inference_steps=4, output_type="np", progress=False
    )
    assert np.array_equal(ours.images, theirs.images) and "Sampler: dpm++2m_karras" in theirs.parameters[0]
    other = tiny_pipe("a red circle", sampler="euler", seed=3, num_inference_steps=4, output_type="np", progress=False)
    assert np.abs(other.images - ours.images).max() > 1e-3  # the name chose a sampler: another one draws otherwise

    argv = [
        "a red circle",
        "--model",
        str(tiny_pipeline_dir),
        "--steps",
        "4",
        "--seed",
        "3",
        "--quiet",
        "--outdir",
        str(tmp_path),
    ]
    assert txt2img([*argv, "--sampler", "DPM++ 2M Karras"]) == 0
    from PIL import Image

    path = capsys.readouterr().out.split()[0]
    assert "Sampler: dpm++2m_karras" in Image.open(path).info["parameters"]
    assert np.abs(np.asarray(Image.open(path)) / 255 - ours.images[0]).max() <= 1 / 255 + 1e-6
