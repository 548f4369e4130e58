"""Distillation (`ldm-distill`, `ldm.train.distill`): the objectives vanish on an exact model and
measure its error otherwise (analytic cases), a student starts as its teacher, runs resume exactly,
and the students samples in ldm and in diffusers to the same images; bad requests are one line."""

import json
import types

import numpy as np
import pytest
import torch
from unet_fixtures import make_shapes_data

from ldm.cli.distill import main
from ldm.train.distill import DistillConfig, Objective, boundary_scalings, ddim_grid, student_unet
from ldm.train.unet import Draws

TINY = ["--quiet", "run.batch_size=4", "data.num_workers=0", "run.mixed_precision=no", "run.sample_every=0",
        "optim.lr=1e-2", "optim.warmup_steps=0", "run.log_every=1"]
PROMPTS, SEEDS = ["a red circle", "a blue square"], [7, 8]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_data(tmp_path_factory.mktemp("distill-data") / "data", 16)


def distill(teacher, data, out, *extra):
    code = main(["--teacher", str(teacher), "--data", str(data), "--output-dir", str(out), *TINY, *extra])
    assert code == 0
    return out / "final"


@pytest.fixture(scope="module")
def lcm_student(tiny_v_pipeline_dir, data, tmp_path_factory):
    return distill(tiny_v_pipeline_dir, data, tmp_path_factory.mktemp("lcm") / "run", "--method", "lcm",
                   "--max-steps", "3", "run.checkpoint_every=0")


def both(folder, steps, **kw):
    """Ours and diffusers' StableDiffusionPipeline (its scheduler: the folder's) on the same seeds."""
    from diffusers import StableDiffusionPipeline

    from ldm import LatentPipeline

    ours = LatentPipeline.from_pretrained(folder)(PROMPTS, seed=SEEDS[0], output_type="np", progress=False, **kw).images
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPTS, num_inference_steps=steps, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                 output_type="np", guidance_scale=kw.get("guidance_scale", 7.5)).images
    return ours, theirs


# ---- the math, on a model whose answer is known ----------------------------------------------------


class Oracle(torch.nn.Module):
    """The exact denoiser of data that is one latent c: ẑ_0 = c + offset at every (z_t, t), given
    as the v that implies it. An offset of 0 is the PF-ODE's own solution: DDIM steps on it are exact."""

    def __init__(self, c, alphas_cumprod, offset=0.0, embedded=False):
        super().__init__()
        self.c, self.alphas_cumprod = c, alphas_cumprod
        self.offset = torch.nn.Parameter(torch.tensor(float(offset)))
        self.config = types.SimpleNamespace(time_cond_proj_dim=256 if embedded else None)

    def forward(self, z, t, encoder_hidden_states=None, timestep_cond=None, return_dict=False):
        a = self.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1)
        return ((a.sqrt() * z - (self.c + self.offset)) / (1 - a).sqrt(),)


def _setup(method, offset, steps=4, first=0):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", timestep_spacing="trailing")
    ac = scheduler.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(1, 4, 8, 8, generator=gen)
    d = DistillConfig(method=method, rounds=(steps,))
    teacher, student = Oracle(c, ac), Oracle(c, ac, offset, embedded=True)
    target = Oracle(c, ac, embedded=True)
    ema = EMAModel(list(target.parameters()), decay=0.95, use_ema_warmup=False)  # θ⁻: the exact model
    objective = Objective(d, teacher, torch.zeros(1, 3, 16), ac, "v_prediction", scheduler.config, target, ema)
    B = 64
    draws = Draws(uncond=torch.zeros(B, dtype=torch.bool), timesteps=first + torch.arange(B) * (1000 - first) // B,
                  noise=torch.randn(B, 4, 8, 8, generator=gen), offset=torch.zeros(B, 4, 1, 1),
                  posterior=torch.zeros(B, 4, 8, 8), spare=torch.rand(B, generator=gen))
    return objective, student, c.expand(B, -1, -1, -1), torch.zeros(B, 3, 16), draws, ac


def test_the_lcm_objective_is_zero_for_the_exact_model_and_the_distance_otherwise():
    # from t_1 = 39 on (t_0 = 19 steps to t = 0, where f is z itself: c plus the noise left at ᾱ_0)
    objective, student, z0, cond, draws, _ = _setup("lcm", 0.0, first=20)
    assert objective(student, z0, cond, draws).item() < 1e-7  # f(z_t) = f⁻(DDIM step) = c, up to c_skip ~ 1e-6
    objective, student, z0, cond, draws, _ = _setup("lcm", 0.1, first=20)
    t = objective.grid[draws.timesteps * 50 // 1000]
    _, c_out = boundary_scalings(t)
    expected = (torch.sqrt((0.1 * c_out) ** 2 + 1e-6) - 1e-3).mean().item()  # pseudo-Huber of a 0.1 error
    assert objective(student, z0, cond, draws).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("steps", [4, 1])
def test_the_progressive_target_of_an_exact_teacher_is_the_data(steps):
    objective, student, z0, cond, draws, ac = _setup("progressive", 0.0, steps)
    assert objective(student, z0, cond, draws).item() < 1e-8
    objective, student, z0, cond, draws, ac = _setup("progressive", 0.1, steps)
    t, _ = ddim_grid(objective_config(), steps)
    sigma2 = 1 - ac[t[draws.timesteps * steps // 1000]]
    # a student off by 0.1 in ẑ_0 is off by 0.1 / σ_t in v: the loss is the mean of 0.01 / σ_t²
    assert objective(student, z0, cond, draws).item() == pytest.approx((0.01 / sigma2).mean().item(), rel=1e-4)


def objective_config():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction", timestep_spacing="trailing").config


def test_progressive_grids_nest_and_end_clean():
    config = objective_config()
    t8, prev8 = ddim_grid(config, 8)
    t4, prev4 = ddim_grid(config, 4)
    assert t4.tolist() == [999, 749, 499, 249] and prev4.tolist() == [749, 499, 249, -1]
    assert set(t4.tolist()) <= set(t8.tolist())  # a round's teacher steps on its own grid
    assert prev8[-1] == -1


def test_a_student_starts_as_its_teacher(tiny_v_pipeline_dir):
    from diffusers import UNet2DConditionModel

    from ldm.guidance import guidance_embedding

    teacher = UNet2DConditionModel.from_pretrained(tiny_v_pipeline_dir / "unet").eval()
    student = student_unet(teacher, 256).eval()
    assert student.config.time_cond_proj_dim == 256 and teacher.config.time_cond_proj_dim is None
    z, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        a = teacher(z, t, encoder_hidden_states=cond).sample
        w = guidance_embedding(torch.tensor([3.0, 9.0]), 256)
        b = student(z, t, encoder_hidden_states=cond, timestep_cond=w).sample
    assert torch.equal(a, b)


def test_the_guidance_embedding_is_diffusers(tiny_v_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from ldm.guidance import guidance_embedding

    for w in (1.0, 7.5, 3.3):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(w - 1).repeat(2),
                                                                   embedding_dim=64)
        assert torch.equal(guidance_embedding(torch.tensor([w, w]), 64), ref)


# ---- students, trained through the CLI ---------------------------------------------------------------


def test_an_lcm_student_samples_in_diffusers_to_the_same_images(lcm_student):
    card = json.loads((lcm_student / "distillation.json").read_text())
    assert card["method"] == "lcm" and card["sampler"] == "lcm" and card["steps"] == 4 and card["max_steps"] == 50
    scheduler = json.loads((lcm_student / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    ours, theirs = both(lcm_student, 4)  # no sampler, no steps: the card's
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-3
    assert np.abs(ours[0] - ours[1]).max() > 0.05
    low, theirs_low = both(lcm_student, 4, guidance_scale=3.0)
    assert np.abs(low - theirs_low).max() <= 1e-3
    assert np.abs(low - ours).max() > 1e-3  # w goes in through the embedding, and it was trained


def test_progressive_rounds_chain_and_the_student_samples_in_diffusers(tiny_v_pipeline_dir, data, tmp_path):
    final = distill(tiny_v_pipeline_dir, data, tmp_path / "run", "--method", "progressive", "--max-steps", "2",
                    "distill.rounds=[2,1]", "run.checkpoint_every=0")
    card = json.loads((final / "distillation.json").read_text())
    assert (card["method"], card["sampler"], card["steps"], card["rounds"]) == ("progressive", "ddim", 1, [2, 1])
    assert card["teacher"] == str(tiny_v_pipeline_dir)
    round2 = (tmp_path / "run" / "round-2-1steps" / "config.yaml").read_text()
    assert f"base: {tmp_path / 'run' / 'round-1-2steps' / 'final'}" in round2  # the last student teaches the next
    ours, theirs = both(final, 1)
    assert np.abs(ours - theirs).max() <= 1e-3 and np.abs(ours[0] - ours[1]).max() > 0.05


def test_lcm_resume_is_exact(tiny_v_pipeline_dir, data, tmp_path):
    from safetensors.torch import load_file

    args = ("--method", "lcm", "run.checkpoint_every=2", "optim.schedule=constant")  # cosine: on --max-steps
    distill(tiny_v_pipeline_dir, data, tmp_path / "a", "--max-steps", "4", *args)
    distill(tiny_v_pipeline_dir, data, tmp_path / "b", "--max-steps", "2", *args)
    distill(tiny_v_pipeline_dir, data, tmp_path / "b", "--max-steps", "4", "--resume", "latest", *args)
    a, b = (tmp_path / run / "checkpoints" / "step-0000004" for run in "ab")
    for name in ("model-unet", "ema-unet", "optimizer-main"):  # ema-unet: the student's EMA, LCM's target θ⁻
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in "ab"]
    assert losses[0][2:] == losses[1][-2:]


# ---- bad requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "NOT_A_FOLDER"], "not a pipeline folder"),
    (["distill.rounds=[8,3]"], "halve each round"),
    (["distill.guidance_min=9", "distill.guidance_max=3"], "distill.guidance_min and guidance_max"),
    (["text_encoder.mode=joint"], "set text_encoder.mode=frozen"),
    (["--method", "lcm", "distill.solver_steps=30"], "distill.solver_steps must divide"),
])
def test_bad_distillation_settings_are_one_line_errors(tiny_v_pipeline_dir, data, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / e) if e == "NOT_A_FOLDER" else e for e in extra]
    teacher = [] if "--teacher" in extra else ["--teacher", str(tiny_v_pipeline_dir)]
    method = [] if "--method" in extra else ["--method", "progressive"]
    with pytest.raises(SystemExit) as e:
        main([*teacher, *method, "--data", str(data), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
              *TINY, *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("args, message", [
    (["--sampler", "euler"], "an LCM student distilled for sampler lcm; euler would not"),
    (["--steps", "51"], "supports at most 50 steps, got 51"),
    (["--negative", "green"], "takes no negative prompt"),
    (["--guidance-rescale", "0.7"], "guidance_rescale does not apply"),
])
def test_a_student_refuses_what_it_was_not_distilled_for(lcm_student, tmp_path, capsys, args, message):
    from ldm.cli.txt2img import main as txt2img

    with pytest.raises(SystemExit) as e:
        txt2img(["a red circle", "--model", str(lcm_student), "--outdir", str(tmp_path), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_sampler_lcm_is_for_lcm_students_only(tiny_pipe):
    with pytest.raises(ValueError, match="this model is not one"):
        tiny_pipe("a red circle", sampler="lcm", num_inference_steps=4, progress=False)


def test_the_evaluation_defaults_to_a_students_own_sampler_and_steps(tmp_path):
    from ldm.data.shapes_eval import check_eval_args

    card = {"method": "lcm", "sampler": "lcm", "steps": 4, "max_steps": 50, "guidance_scale": [3.0, 9.0]}
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    common = dict(latent_factor=8, default_size=64, outdir=str(tmp_path / "e"), num_prompts=4, seed=0, cfg=7.5,
                  batch_size=4, size=None, overwrite=False, scheduler_config=config)
    assert check_eval_args(sampler=None, steps=None, student=card, embedded=True, **common) == ("lcm", 4, 64, 0.0)
    assert check_eval_args(sampler=None, steps=None, **common) == ("euler", 25, 64, 0.7)  # a teacher's defaults
    with pytest.raises(ValueError, match="distilled for sampler lcm; euler would not"):
        check_eval_args(sampler="euler", steps=None, student=card, embedded=True, **common)
