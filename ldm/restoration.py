"""Inverse problems with the diffusion prior: restore x from a measurement y = A(x) + n, n ~ N(0, σ_y² I).

The model is not retrained. In three methods the measurement enters the sampler as a per-step correction,
as editing's known region does (`ldm.editing`): hard data consistency (`DataConsistency`, the default,
see its docstring), and the two below; the fourth, exemplar (gray's default), colours y from a sample.

Reconstruction guidance in latent space (`ReconstructionGuidance`; DPS, Chung et al. 2023, "Diffusion
Posterior Sampling for General Noisy Inverse Problems", Alg. 1 and 2; through the decoder as in their
latent follow-ups): at each step the clean estimate ẑ_0(z_t) (Tweedie's formula, from the guided
model output) is decoded, x̂_0 = D(ẑ_0), and the sampler's step is followed by

    z_{t-1} ← z_{t-1} − ζ ∇_{z_t} ‖y − A(x̂_0(z_t))‖,

the gradient of the residual's norm (not its square: DPS's step-size rule ζ_t = ζ / ‖y − A(x̂_0)‖ on the
squared norm), taken through the decoder and the U-Net by autograd. The steps are DDIM's (the ODE; DPS
Alg. 2 uses DDIM too) or DDPM's (the SDE, Alg. 1): samplers whose latents are z_t itself, so that ζ
means one thing whatever the sampler. Classifier-free guidance from the caption stays as it is.

Particle filtering for masks (`ParticleFilter`; SMC-Diff, Trippe et al. 2022, "Diffusion probabilistic
modeling of protein backbones in 3D for the motif-scaffolding problem", Alg. 1): K particles of
replacement sampling with DDPM's steps. The known latents are noised along one forward trajectory
y_{1:T} (eq. 1 composed over the sampling grid); each particle's weight at step t is the likelihood
of the next observation under its own reverse transition, w_k = N(y_{t-1}; μ_θ(x_t^k), σ_t² I) on the
known cells, and the particles are resampled (multinomial) in proportion. Here the children are
drawn first and resampled with their parents' weights (the weight depends on x_t alone, so this is
the same bootstrap filter). Replacement needs latent cells whose every pixel is known; a random
pixel mask leaves none, and gets reconstruction guidance instead.

Exemplar colourisation for grayscale (`colour_transfer`; Welsh, Ashikhmin and Mueller 2002,
"Transferring Color to Greyscale Images"): the model draws the caption from noise (txt2img, K
exemplars), and each pixel of y takes the chroma the exemplar has at its luma: a kernel regression of the
exemplar's chroma on its luma, looked up at y's lightly smoothed luma, then a 3 × 3 median of the chroma.
The output's luma is y's (smoothed like the lookup when σ_y > 0: the noise is not copied), so it explains
the measurement by construction; the prior supplies only what y lacks, the colours, and where the
caption's colours have distinct lumas that is enough. Of K exemplars the one whose luma histogram best
covers y's is kept (`coverage`). It is gray's default: on held-out scenes it beat the sampler-based
methods on every measure at under a fortieth of their cost (docs/restoration.md).

The degradations are small linear operators on images in [−1, 1] (B, 3, H, W) with their adjoints
and pseudo-inverses; a Python user may pass any differentiable callable instead (`Operator`).
All preserve constants (their rows sum to 1; a mask selects), so a measurement read from a file
in [0, 1] maps to [−1, 1] as the image does. σ_y is in [0, 1] pixel units (0.02 ≈ 5 levels of 255).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ldm.schedule import predicted_z0

METHODS = ("consistency", "guidance", "smc", "exemplar")
# on held-out shapes scenes consistency beat DPS's guidance by far, and exemplar beat consistency on gray
DEFAULT_METHOD = "consistency"  # gray's: DEFAULT_GRAY_METHOD (default_method)
DEFAULT_GRAY_METHOD = "exemplar"
DEGRADATIONS = ("downsample:F", "blur:SIGMA", "gray", "mask")
DOWNSAMPLE_FACTORS = (2, 4, 8)
# The samplers each method runs on, the first its default (see the module docstring).
METHOD_SAMPLERS = {"consistency": ("ddim",), "guidance": ("ddim", "ddpm"), "smc": ("ddpm",)}
# ζ of guidance (DPS's value for inpainting and super-resolution); Adam's learning rate for consistency
# (0.3 fitted y as well but broke shapes into textures and outlines: docs/restoration.md)
DEFAULT_STEP_SIZE = {"guidance": 1.0, "consistency": 0.01}
# consistency starts from the first estimate noised to this strength (CCDF), where the operator has one that
# carries the picture's colours; gray and custom operators start from noise (strength 1)
DEFAULT_STRENGTH = 0.3
DEFAULT_ITERATIONS = 10  # consistency: Adam steps per sampling step
MAX_ITERATIONS = 1000
DEFAULT_PARTICLES = 4  # smc's K (consistency's: default_particles)
MAX_PARTICLES = 64
# restarts: each pass after the first starts from the last output moved onto {A x = y} (Operator.project)
# and noised to this strength; gray gets DEFAULT_RESTARTS, the others none (docs/restoration.md)
RESTART_STRENGTH = 0.5
DEFAULT_RESTARTS = 1
MAX_RESTARTS = 10
# consistency with K > 1 particles: the potential's scale λ per unit of RMS residual ([0, 1] units). A
# residual 0.05 worse costs a factor e^2.5; λ 200 (sharper) and K 8 were no better on validation scenes
POTENTIAL_SCALE = 50.0
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
# exemplar (gray): chroma looked up by luma in the model's own sample of the caption; tuned on 96 validation
# scenes (docs/restoration.md): a wider kernel (0.02-0.05) mixes colours of near lumas, a wider
# smoothing (1 px) or median (5 px) rounds corners, and no median leaves speckles the scorer calls hollow
EXEMPLAR_BANDWIDTH = 0.01  # the luma kernel's standard deviation, [−1, 1] units
EXEMPLAR_SMOOTHING = 0.7  # px: the Gaussian smoothing of y for the lookup (and of the output's luma if σ_y > 0)
EXEMPLAR_MEDIAN = 3  # px: the window of the chroma's median
EXEMPLAR_LUMA_TOLERANCE = 0.1  # the median's pixels: those whose smoothed luma is this near the centre's
EXEMPLAR_BINS = 256  # the luma table's bins over [−1, 1]


class Operator:
    """A degradation A: images (B, 3, H, W) in [−1, 1] → measurements (B, C, h, w). The built-in ones
    are linear, with an `adjoint` and a `pseudo_inverse`; `CustomOperator` wraps a user's own."""

    name = "custom"
    channels = 3  # the measurement's channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def measured_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of A(x) for an image of height × width."""
        return height, width

    def image_size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) of the image a measurement of h × w is of."""
        return h, w

    def weights(self, y: torch.Tensor) -> torch.Tensor:
        """Which entries of a measurement were measured (1) or are to be ignored (0): all of them here."""
        return torch.ones_like(y)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} operator has no adjoint")

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} operator has no pseudo-inverse")

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x moved onto {x : A x = y} along the operator's range: x + A⁺(y − A x), DDNM's range-null
        decomposition A⁺y + (I − A⁺A)x (Wang et al. 2023), which keeps what A does not see."""
        return x + self.pseudo_inverse(y - self(x))


class CustomOperator(Operator):
    """Any differentiable callable A (a Python user's own), same-size measurements unless
    `measured_size` says otherwise; reconstruction guidance needs nothing more of it."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "custom")

    def __call__(self, x):
        return self.fn(x)


class Downsample(Operator):
    """Area downsampling by `factor`: each output pixel the mean of a factor × factor block. Its adjoint
    spreads a pixel over its block divided by factor²; A Aᵀ = I / factor², so A⁺ = factor² Aᵀ: nearest-
    neighbour upsampling."""

    def __init__(self, factor: int):
        self.factor, self.name = factor, f"downsample:{factor}"

    def __call__(self, x):
        return F.avg_pool2d(x, self.factor)

    def measured_size(self, height, width):
        return height // self.factor, width // self.factor

    def image_size(self, h, w):
        return h * self.factor, w * self.factor

    def adjoint(self, y):
        return self.pseudo_inverse(y) / self.factor**2

    def pseudo_inverse(self, y):
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)


class Blur(Operator):
    """A Gaussian blur of standard deviation σ px with circular boundaries (the convention of deblurring
    benchmarks): a circulant matrix with a symmetric kernel, so Aᵀ = A, and its Fourier transform is
    the kernel's, which makes the pseudo-inverse and Wiener's filter exact (`fourier_inverse`)."""

    def __init__(self, sigma: float):
        self.sigma, self.name = sigma, f"blur:{sigma:g}"
        self.radius = math.ceil(3 * sigma)
        taps = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        self.kernel = kernel / kernel.sum()  # (2r + 1,): separable

    def __call__(self, x):
        return separable_blur(x, self.kernel.to(x.device, x.dtype), "circular")

    def adjoint(self, y):
        return self(y)

    def transfer(self, height: int, width: int) -> torch.Tensor:
        """K̂: the blur's transfer function on the height × width DFT grid, (H, W) real (the kernel is even)."""
        r = self.radius
        if 2 * r + 1 > min(height, width):
            raise ValueError(f"blur:{self.sigma:g} needs an image wider than its kernel ({2 * r + 1} px), got "
                             f"{width}x{height}")
        impulse = torch.zeros(height, width, dtype=torch.float64)
        impulse[0, 0] = 1
        return torch.fft.fft2(self(impulse[None, None])[0, 0]).real  # the response at (0, 0) is even: real

    def fourier_inverse(self, y: torch.Tensor, regularization: float) -> torch.Tensor:
        """Wiener's deconvolution, X̂ = K̂ Ŷ / (K̂² + λ), for λ > 0 (the noise-to-signal power ratio);
        λ = 0 is the pseudo-inverse, which drops the frequencies the blur all but removed (K̂ < 1e-3)."""
        k = self.transfer(*y.shape[-2:]).to(y.device)
        if regularization > 0:
            gain = k / (k**2 + regularization)
        else:
            gain = torch.where(k.abs() >= 1e-3, 1 / k, torch.zeros_like(k))
        return torch.fft.ifft2(torch.fft.fft2(y.to(torch.float64)) * gain).real.to(y.dtype)

    def pseudo_inverse(self, y):
        return self.fourier_inverse(y, 0.0)


class Grayscale(Operator):
    """Luma, y = Σ_c w_c x_c with ITU-R 601-2's weights (PIL's "L"); Aᵀ y = w y, A⁺ y = w y / ‖w‖²."""

    channels = 1
    name = "gray"

    def _w(self, like):
        return torch.tensor(LUMA, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)

    def __call__(self, x):
        return (x * self._w(x)).sum(dim=1, keepdim=True)

    def adjoint(self, y):
        return y * self._w(y)

    def pseudo_inverse(self, y):
        w = self._w(y)
        return y * w / (w**2).sum()

    def project(self, x, y):
        """x with its luma replaced by y's and its chroma kept: y − A x added to every channel (a right
        inverse, as Σw = 1; YCbCr's Cb and Cr are unchanged). A⁺ would add it along w and tint green."""
        return x + (y - self(x))


class PixelMask(Operator):
    """Inpainting's operator: A x = (1 − m) ⊙ x with m (B or 1, 1, H, W) the pixels to fill (1; white in
    a mask image, as for inpainting); self-adjoint, and its own pseudo-inverse."""

    name = "mask"

    def __init__(self, mask: torch.Tensor):
        self.mask = (mask > 0.5).float()

    def _keep(self, like):
        return (1 - self.mask).to(like.device, like.dtype)

    def __call__(self, x):
        return x * self._keep(x)

    def weights(self, y):
        return self._keep(y).expand_as(y)

    def adjoint(self, y):
        return self(y)

    def pseudo_inverse(self, y):
        return self(y)


def parse_degradation(spec: str, mask: torch.Tensor | None = None) -> Operator:
    """An operator from its name: downsample:F (F in 2, 4, 8), blur:SIGMA (px, in (0, 16]), gray, or mask
    (with `mask`); a ValueError listing them for anything else."""
    if not isinstance(spec, str):
        raise ValueError(f"degradation must be a name ({', '.join(DEGRADATIONS)}) or an ldm.restoration.Operator, "
                         f"got {type(spec).__name__}")
    name, _, value = spec.strip().lower().partition(":")
    if name == "mask" and not value:
        if mask is None:
            raise ValueError("degradation mask needs the mask: pass mask_image (white = the pixels to fill)")
        return PixelMask(mask)
    if mask is not None:
        raise ValueError(f"mask_image applies to degradation 'mask', not {spec!r}")
    if name == "gray" and not value:
        return Grayscale()
    try:
        number = float(value)
    except ValueError:
        number = None
    if name == "downsample" and number in DOWNSAMPLE_FACTORS:
        return Downsample(int(number))
    if name == "blur" and number is not None and 0 < number <= 16:
        return Blur(number)
    if name == "downsample":
        raise ValueError(f"downsample takes a factor of {', '.join(map(str, DOWNSAMPLE_FACTORS))} "
                         f"(e.g. downsample:4), got {spec!r}")
    if name == "blur":
        raise ValueError(f"blur takes a standard deviation in pixels in (0, 16] (e.g. blur:2), got {spec!r}")
    raise ValueError(f"unknown degradation {spec!r}; choose one of: {', '.join(DEGRADATIONS)}")


def measure(x: torch.Tensor, operator: Operator, sigma_y: float, generator: torch.Generator | None = None):
    """y = A(x) + n, n ~ N(0, σ_y²) in [0, 1] units (2σ_y in [−1, 1]): a synthetic measurement."""
    y = operator(x)
    if sigma_y:
        y = y + 2 * sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    return y


def residual_rms(y: torch.Tensor, fitted: torch.Tensor, operator: Operator) -> torch.Tensor:
    """‖y − A(x̂)‖ per image as a root mean square over the measured entries, in [0, 1] units: the
    consistency check. A restoration that explains the measurement leaves about σ_y."""
    w = operator.weights(y)
    squared = ((y - fitted) * w).pow(2).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)
    return squared.sqrt() / 2


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def default_method(operator: Operator) -> str:
    """The method `restore` runs when none is named: DEFAULT_GRAY_METHOD for gray, else DEFAULT_METHOD."""
    return DEFAULT_GRAY_METHOD if isinstance(operator, Grayscale) else DEFAULT_METHOD


def check_restoration(method: str, sampler: str | None, sigma_y, operator: Operator, *, step_size=None,
                      iterations=None, particles=None, restarts=None, strength=None) -> str | None:
    """The sampler to run `method` on (its default where `sampler` is None; exemplar: the sampler given, None
    for the pipeline's), or a ValueError for a method, sampler, σ_y, step size, iteration count, K, restart
    count or strength that cannot run."""
    if method not in METHODS:
        raise ValueError(f"unknown restoration method {method!r}; choose one of: {', '.join(METHODS)}")
    if not isinstance(sigma_y, (int, float)) or isinstance(sigma_y, bool) or not math.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y (the measurement's noise, in [0, 1] pixel units) must be ≥ 0, got {sigma_y!r}")
    given = {"step_size": step_size, "iterations": iterations, "particles": particles, "restarts": restarts,
             "strength": strength}
    takes = {"consistency": ("step_size", "iterations", "particles", "restarts", "strength"),
             "guidance": ("step_size", "strength"), "smc": ("particles", "strength"),
             "exemplar": ("particles",)}[method]
    stray = [name for name, value in given.items() if value is not None and name not in takes]
    if stray:
        raise ValueError(f"{' and '.join(stray)} {'is' if len(stray) == 1 else 'are'} not a setting of method {method} "
                         f"(it takes {', '.join(takes[:-1]) + ' and ' if len(takes) > 1 else ''}{takes[-1]})")
    if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                  or not math.isfinite(step_size) or step_size < 0):
        raise ValueError(f"step_size must be a number ≥ 0, got {step_size!r}")
    if iterations is not None and not _whole(iterations, 1, MAX_ITERATIONS):
        raise ValueError(f"iterations must be a whole number in [1, {MAX_ITERATIONS}], got {iterations!r}")
    if particles is not None and not _whole(particles, 1, MAX_PARTICLES):
        raise ValueError(f"particles (K) must be a whole number in [1, {MAX_PARTICLES}], got {particles!r}")
    if restarts is not None and not _whole(restarts, 0, MAX_RESTARTS):
        raise ValueError(f"restarts must be a whole number in [0, {MAX_RESTARTS}], got {restarts!r}")
    kind = type(operator)
    if restarts and kind.project is Operator.project and kind.pseudo_inverse is Operator.pseudo_inverse:
        raise ValueError(f"restarts start from the output moved onto A x = y, which needs the {operator.name} "
                         "operator's pseudo_inverse (or project): subclass ldm.restoration.Operator, or leave restarts "
                         "at 0")
    if method == "smc":
        if not isinstance(operator, PixelMask):
            raise ValueError(f"method smc fills a mask (degradation 'mask'); for {operator.name} use method "
                             "consistency or guidance")
        if sigma_y:
            raise ValueError("method smc holds the known pixels exactly (sigma_y 0); for a noisy measurement use "
                             "method consistency or guidance")
    if method == "exemplar":
        if not isinstance(operator, Grayscale):
            raise ValueError(f"method exemplar colours a gray picture (degradation gray); for {operator.name} use "
                             "method consistency or guidance")
        return sampler  # the exemplars are txt2img's: any sampler
    allowed = METHOD_SAMPLERS[method]
    if sampler is None:
        return allowed[0]
    if sampler not in allowed:
        raise ValueError(f"method {method} runs on sampler{'s' if len(allowed) > 1 else ''} {' or '.join(allowed)} "
                         f"(its correction acts on z_t itself), not {sampler}")
    return sampler


def measurement_tensor(value, channels: int) -> torch.Tensor:
    """A measurement as (B, C, h, w) in [−1, 1]: a PIL image (or a list of them; converted to "L" for a
    one-channel operator, else "RGB"), or a float array/tensor on [0, 1]'s scale (noise may reach past
    it), (h, w), (C, h, w) or (B, C, h, w)."""
    import numpy as np

    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("measurement: got an empty list")
    tensors = []
    for v in values:
        if hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image
            a = np.asarray(v.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
            t = torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1)[None]
        elif isinstance(v, (np.ndarray, torch.Tensor)):
            t = torch.as_tensor(np.asarray(v) if isinstance(v, np.ndarray) else v).float().cpu()
            t = t.reshape(1, 1, *t.shape) if t.ndim == 2 else t[None] if t.ndim == 3 else t
            if t.ndim != 4 or not torch.isfinite(t).all():  # noise may carry values past [0, 1]: kept as they are
                raise ValueError("measurement: an array must be (h, w), (C, h, w) or (B, C, h, w) of finite values "
                                 "(0 black, 1 white)")
        else:
            raise ValueError(f"measurement: a PIL image, array or tensor, not {type(v).__name__}")
        if t.shape[1] != channels:
            raise ValueError(f"measurement: this degradation measures {channels} channel(s), got {t.shape[1]}")
        tensors.append(t)
    if len({tuple(t.shape[-2:]) for t in tensors}) > 1:
        raise ValueError("measurement: the pictures differ in size; restore them in separate calls")
    return torch.cat(tensors) * 2 - 1


def particle_seed(seed: int, k: int) -> int:
    """The seed of particle k of an image drawn with `seed`: the seed itself for k = 0 (one particle is a
    plain draw), else one whose low 32 bits differ, since torch's CPU generator (and so diffusers') reads a
    seed's low 32 bits only (seed + k·2³² would draw particle 0's noise again). The step is 2³² over the
    golden ratio, so the particles of seed s miss s + 1, s + 2, …, the seeds of the batch's next images."""
    return seed if k == 0 else (seed + k * 0x9E3779B1) % 2**32


def default_strength(method: str, operator: Operator) -> float:
    """Where a method starts by default: consistency from the first estimate at DEFAULT_STRENGTH for
    downsampling, blur and masks; everything else (gray: its estimate has no colour) from noise."""
    if method == "consistency" and isinstance(operator, (Downsample, Blur, PixelMask)):
        return DEFAULT_STRENGTH
    return 1.0


def default_particles(method: str, operator: Operator) -> int:
    """K by default: smc's DEFAULT_PARTICLES; consistency 4 for gray (whose layout only the residual picks
    out), else 1 (exemplar: more exemplars did not pass more validation scenes)."""
    if method == "smc":
        return DEFAULT_PARTICLES
    return 4 if method == "consistency" and isinstance(operator, Grayscale) else 1


def default_restarts(method: str, operator: Operator) -> int:
    """Restarts by default: DEFAULT_RESTARTS for consistency on gray, else none."""
    return DEFAULT_RESTARTS if method == "consistency" and isinstance(operator, Grayscale) else 0


def initial_estimate(operator: Operator, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
    """The non-generative restoration a sample can start from (CCDF, Chung et al. 2022, "Come-Closer-
    Diffuse-Faster", §3: the forward-diffused estimate is closer to the answer than noise): bicubic for
    downsampling, Wiener for blur (λ from σ_y), the gray image for grayscale, the surroundings' fill for a
    mask; (B, 3, H, W) in [−1, 1]."""
    from ldm.editing import fill_masked

    if isinstance(operator, Downsample):
        return bicubic_upsample(y, operator.factor)
    if isinstance(operator, Blur):
        return operator.fourier_inverse(y, max((2 * sigma_y) ** 2 * 10, 1e-3)).clamp(-1, 1)
    if isinstance(operator, Grayscale):
        return y.expand(-1, 3, -1, -1).clamp(-1, 1)
    if isinstance(operator, PixelMask):
        return fill_masked(y.clamp(-1, 1), operator.mask.to(y.device).expand(len(y), -1, -1, -1))
    raise ValueError(f"strength below 1 starts from a first estimate, which the {operator.name} operator has none "
                     "of; leave strength unset")


def separable_blur(x: torch.Tensor, taps: torch.Tensor, mode: str) -> torch.Tensor:
    """x (B, C, H, W) convolved with the symmetric 1-D kernel `taps` along rows, then columns, its edges padded
    by `mode` ("circular": Blur's; "replicate": `smooth`'s)."""
    c, r = x.shape[1], len(taps) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of σ px with the edges replicated (not Blur's circular ones); σ 0: x itself."""
    if sigma <= 0:
        return x
    r = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    return separable_blur(x, taps / taps.sum(), "replicate")


def _bins(luma: torch.Tensor) -> torch.Tensor:
    return ((luma.clamp(-1, 1) + 1) / 2 * (EXEMPLAR_BINS - 1)).round().long()


@functools.lru_cache(maxsize=4)
def _luma_kernel(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bins' centres (EXEMPLAR_BINS,) and the Gaussian kernel between them (bins, bins), float64."""
    centres = torch.linspace(-1, 1, EXEMPLAR_BINS, dtype=torch.float64, device=device)
    return centres, torch.exp(-0.5 * ((centres[:, None] - centres[None]) / EXEMPLAR_BANDWIDTH) ** 2)


def luma_table(exemplar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(density, chroma) of one exemplar (3, H, W) in [−1, 1] over EXEMPLAR_BINS luma bins: the share of its
    pixels near each luma (a Gaussian kernel of EXEMPLAR_BANDWIDTH), and their mean chroma x − A(x)·1
    there (Nadaraya-Watson); a bin with no pixel near takes the nearest populated bin's chroma."""
    x = exemplar.double()[None]
    luma = Grayscale()(x)[0, 0]
    chroma = (x[0] - luma).flatten(1).T  # (HW, 3): A(chroma) = 0, as Σw = 1
    index = _bins(luma).flatten()
    counts = torch.bincount(index, minlength=EXEMPLAR_BINS).double()
    sums = torch.zeros(EXEMPLAR_BINS, 3, dtype=torch.float64, device=x.device).index_add_(0, index, chroma)
    centres, kernel = _luma_kernel(x.device)
    near, weighted = kernel @ counts, kernel @ sums
    populated = counts.nonzero()[:, 0]
    nearest = populated[(centres[:, None] - centres[populated][None]).abs().argmin(1)]
    chroma = torch.where((near > 1e-6)[:, None], weighted / near.clamp_min(1e-12)[:, None],
                         sums[nearest] / counts[nearest, None])
    return near / counts.sum(), chroma


def colour_transfer(y: torch.Tensor, exemplars: torch.Tensor, sigma_y: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour gray measurements y (B, 1, H, W) from exemplars (B, 3, H, W), both in [−1, 1] (module
    docstring): (images (B, 3, H, W) in [−1, 1], coverage (B,)), coverage the mean log density of y's
    smoothed lumas under the exemplar's (higher: the exemplar has y's lumas; picks among exemplars)."""
    looked_up = smooth(y.double(), EXEMPLAR_SMOOTHING)
    luma = looked_up if sigma_y > 0 else y.double()
    images, coverage = [], []
    for lookup, exemplar in zip(looked_up, exemplars):
        density, table = luma_table(exemplar)
        index = _bins(lookup[0])
        images.append(table[index].permute(2, 0, 1))  # (3, H, W) chroma
        coverage.append(torch.log(density[index] + 1e-4).mean())
    chroma = torch.stack(images)
    m, p, b = EXEMPLAR_MEDIAN, EXEMPLAR_MEDIAN // 2, len(chroma)
    windows = F.unfold(F.pad(chroma, (p, p, p, p), mode="replicate"), m).view(b, 3, m * m, -1)  # (B, 3, m², HW)
    lumas = F.unfold(F.pad(looked_up, (p, p, p, p), mode="replicate"), m).view(b, 1, m * m, -1)
    alike = (lumas - looked_up.flatten(2)[:, :, None]).abs() <= EXEMPLAR_LUMA_TOLERANCE  # the centre's region
    chroma = windows.masked_fill(~alike, float("nan")).nanmedian(2).values.view_as(chroma)
    chroma = chroma - Grayscale()(chroma)  # each channel's median moves its luma off 0: back onto A(chroma) = 0
    return (luma + chroma).clamp(-1, 1).to(y.dtype), torch.stack(coverage).to(y.dtype)


# ---- the per-step corrections ---------------------------------------------------------------------


class ReconstructionGuidance:
    """DPS's correction (module docstring). Used as the denoiser, it returns the guided model output at
    z_t and keeps ∇_{z_t} ‖y − A(D(ẑ_0(z_t)))‖ per image; as the constraint after the sampler's step,
    it subtracts ζ times that gradient. `decode` maps latents to images in [−1, 1] with autograd."""

    def __init__(self, denoiser, decode: Callable, operator: Operator, y: torch.Tensor, step: float,
                 alphas_cumprod: torch.Tensor, prediction_type: str):
        self.denoiser, self.decode, self.operator = denoiser, decode, operator
        self.y, self.step = y, step  # (B, C, h, w) in [−1, 1]
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.weights = operator.weights(y)
        self.gradient = None

    def residual_norms(self, z0: torch.Tensor) -> torch.Tensor:
        """‖y − A(D(z0))‖ per image, (B,), over the measured entries."""
        return ((self.y - self.operator(self.decode(z0).float())) * self.weights).flatten(1).norm(dim=1)

    def __call__(self, z_t: torch.Tensor, t) -> torch.Tensor:
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            out = self.denoiser.predict(z, t)
            a_t = self.alphas_cumprod[int(t)].to(z.device, torch.float64)  # DDIM's and DDPM's t are whole
            norms = self.residual_norms(predicted_z0(out, z, a_t, self.prediction_type))
            self.gradient = torch.autograd.grad(norms.sum(), z)[0]  # the sum: each image's own gradient
        return out.detach()

    def constraint(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        return latents - self.step * self.gradient.to(latents.dtype)


class DataConsistency(ReconstructionGuidance):
    """Hard data consistency in latent space (ReSample, Song et al. 2024, "Solving Inverse Problems with
    Latent Diffusion Models via Hard Data Consistency", §3.2; the clean-estimate update of MPGD, He et
    al. 2024): at each step the clean estimate itself is fitted to the measurement,

        ẑ_0* = argmin_z ‖y − A(D(z))‖²  by `iterations` Adam steps of learning rate `step` from ẑ_0,

    through the decoder alone (no U-Net backward). An image's residual leaves the loss once it is down to
    its noise, ‖y − A(D(z))‖² ≤ (2σ_y)² · entries (Morozov's discrepancy principle: the noise is not
    fitted; Adam's momentum may still carry it a little), and the loop ends when every image is there.
    The sampler's step is moved by what the fit moved,
    z_{t-1} ← z_{t-1} + √ᾱ_{t-1} (ẑ_0* − ẑ_0): DDIM's step with ẑ_0* in place of ẑ_0 and the
    network's ε̂ kept (ReSample re-noises instead; DDIM's deterministic path needed no extra noise here).

    With K > 1 `particles` (rows in groups of K per image, each from its own seed) the samplers are also
    resampled by how well they explain y: the potential G_t = exp(−λ ρ_t), ρ_t the RMS residual of the
    step's unfitted ẑ_0 in [0, 1] units and λ = POTENTIAL_SCALE, enters each particle's weight as
    G_t / G_{t+1} (the "difference" potential of FK steering, Singhal et al. 2025, "A General Framework
    for Inference-Time Scaling and Steering of Diffusion Models", §3; a twisted SMC sampler in the sense of
    Wu et al. 2023, whose product telescopes to exp(−λ ρ) of the final image), and a group is resampled
    (multinomial) when its effective sample size falls below K/2. The consistency fit is the proposal; its
    ratio to the prior's transition is not in the weights, so this steers rather than samples the
    posterior exactly. After the last step every row of a group holds its best particle."""

    def __init__(self, *args, iterations: int, timesteps: torch.Tensor, sigma_y: float, particles: int = 1,
                 generators: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.iterations, self.K, self.generators = iterations, particles, generators
        self.potential = self.previous = self.log_weights = None
        self.steps = len(timesteps)
        self.entries = self.weights.flatten(1).sum(1)  # measured entries per image
        # ‖n‖² expected of the measurement's noise, in [−1, 1] units: (2σ_y)² per measured entry
        self.target = (2 * sigma_y) ** 2 * self.entries
        table = self.alphas_cumprod.to(torch.float64).cpu()
        ts = [int(t) for t in timesteps]
        # ᾱ each step ends at: the next step's level, and the clean end after the last
        self.next_level = {t: (table[n].item() if n is not None else 1.0) for t, n in zip(ts, ts[1:] + [None])}
        self.shift = None

    def __call__(self, z_t: torch.Tensor, t) -> torch.Tensor:
        out = self.denoiser(z_t, t)
        a_t = self.alphas_cumprod[int(t)].to(z_t.device, torch.float64)
        z0 = predicted_z0(out, z_t, a_t, self.prediction_type).float()
        z = z0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.step)
        unfitted = None
        with torch.enable_grad():
            for _ in range(self.iterations):
                optimizer.zero_grad()
                squared = self.residual_norms(z).pow(2)  # (B,)
                unfitted = squared.detach() if unfitted is None else unfitted
                fitting = squared > self.target  # the discrepancy principle: no image is fitted past its noise
                if not fitting.any():
                    break
                (squared * fitting).sum().backward()
                optimizer.step()
        self.shift = math.sqrt(self.next_level[int(t)]) * (z.detach() - z0)
        if self.K > 1:  # ρ in [0, 1] units: the [−1, 1] residual halved
            self.potential = -POTENTIAL_SCALE * (unfitted.double() / self.entries.double()).sqrt() / 2
        return out

    def constraint(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.shift.to(latents.dtype)
        if self.K == 1:
            return latents
        step = self.potential - (self.previous if self.previous is not None else 0)
        self.log_weights = step if self.log_weights is None else self.log_weights + step
        rows = self.resampled(self.log_weights.view(-1, self.K), last=i == self.steps - 1)
        self.log_weights, self.previous = self.log_weights[rows], self.potential[rows]
        return latents[rows]

    def resampled(self, groups: torch.Tensor, last: bool) -> torch.Tensor:
        """The rows to go on from, (B·K,): per group (K log weights), its best particle everywhere after the
        last step; else, where the effective sample size 1/Σp² < K/2, K multinomial draws (the group's first
        row's generator) with the group's weights set to 0; else the group as it is."""
        rows = []
        for g, w in enumerate(groups):
            p = torch.softmax(w, 0)
            if last:
                pick = torch.full((self.K,), int(w.argmax()))
            elif 1 / p.pow(2).sum() < self.K / 2:
                pick = torch.multinomial(p.float().cpu(), self.K, replacement=True,
                                         generator=self.generators[g * self.K])
                self.log_weights[g * self.K:(g + 1) * self.K] = 0
            else:
                pick = torch.arange(self.K)
            rows.append(g * self.K + pick)
        return torch.cat(rows).to(groups.device)


class ParticleFilter:
    """SMC-Diff (module docstring) over rows that come in groups of K particles of one image. Used as the
    denoiser it returns the model output and computes each particle's log weight from its DDPM
    transition's mean; as the constraint after the DDPM step it resamples each group and puts the
    observation's next level in the known cells (`known`: (B, 1, h, w), 1 = known)."""

    def __init__(self, denoiser, z0: torch.Tensor, known: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor, prediction_type: str, particles: int, generators: list):
        self.denoiser, self.known, self.K = denoiser, known.to(z0.dtype), particles
        self.timesteps = [int(t) for t in timesteps]
        self.prediction_type, self.generators = prediction_type, generators  # one per row
        table = alphas_cumprod.to(torch.float64)
        # ᾱ at each step's start, then the clean end (DDPM's last step goes to ᾱ = 1)
        self.levels = torch.cat([table[timesteps.long().cpu()], torch.ones(1, dtype=torch.float64)])
        self.observations = self._trajectory(z0)
        self.log_weights = None

    def _trajectory(self, z0: torch.Tensor) -> list[torch.Tensor]:
        """y_i for i = 0..N (y_N = z_0): one forward path up the grid,
        q(y_i | y_{i+1}) = N(√(ᾱ_i/ᾱ_{i+1}) y_{i+1}, (1 − ᾱ_i/ᾱ_{i+1}) I),
        the same for the K particles of an image (its first particle's generator)."""
        path = [z0]
        for i in range(len(self.levels) - 2, -1, -1):
            ratio = (self.levels[i] / self.levels[i + 1]).item()
            noise = torch.cat([torch.randn(z0[g:g + 1].shape, generator=self.generators[g], dtype=z0.dtype)
                               for g in range(0, len(z0), self.K)]).to(z0.device)
            path.append(math.sqrt(ratio) * path[-1] + math.sqrt(1 - ratio) * noise.repeat_interleave(self.K, dim=0))
        return path[::-1]

    def __call__(self, z_t: torch.Tensor, t) -> torch.Tensor:
        out = self.denoiser(z_t, t)
        i = self.timesteps.index(int(t))
        a_t, a_prev = self.levels[i].item(), self.levels[i + 1].item()
        beta = 1 - a_t / a_prev
        variance = (1 - a_prev) / (1 - a_t) * beta if a_t < 1 else 0.0  # DDPM's "fixed_small"
        self.log_weights = None
        if variance > 1e-12 and self.K > 1:
            z0 = predicted_z0(out, z_t, torch.tensor(a_t, dtype=torch.float64).to(z_t.dtype), self.prediction_type)
            mean = math.sqrt(a_prev) * beta / (1 - a_t) * z0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * z_t
            gap = (self.observations[i + 1] - mean) * self.known
            self.log_weights = -gap.float().pow(2).flatten(1).sum(1) / (2 * variance)  # (B·K,)
        return out

    def constraint(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        if self.log_weights is not None:
            groups = self.log_weights.view(-1, self.K)  # (B, K)
            picks = [torch.multinomial(torch.softmax(w, 0).cpu(), self.K, replacement=True,
                                       generator=self.generators[g * self.K]) for g, w in enumerate(groups)]
            rows = torch.cat([g * self.K + p for g, p in enumerate(picks)]).to(latents.device)
            latents = latents[rows]
        return self.known * self.observations[i + 1].to(latents.dtype) + (1 - self.known) * latents


# ---- baselines and measures of quality ------------------------------------------------------------------


def bicubic_upsample(y: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic interpolation to factor × the size (torch's kernel, a = −0.75 as OpenCV's), clamped to [−1, 1]."""
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def psnr(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, images in [−1, 1] (peak-to-peak 2)."""
    mse = (x.double() - truth.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-12))


def ssim(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), images in [−1, 1]: their Gaussian window
    (σ 1.5, 11 taps), K1 0.01, K2 0.03, the mean over channels and valid windows; scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2)`."""
    x, truth = x.double(), truth.double()
    c = x.shape[1]
    taps = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-0.5 * (taps / 1.5) ** 2)
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).view(1, 1, 11, 11).repeat(c, 1, 1, 1).to(x.device)

    def blur(v):
        return F.conv2d(v, window, groups=c)

    mx, my = blur(x), blur(truth)
    vx, vy, cov = blur(x * x) - mx**2, blur(truth * truth) - my**2, blur(x * truth) - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def known_cells(masks: torch.Tensor, latent_shape: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w): 1 where every pixel of the latent cell is known (mask 0), the cells SMC replaces."""
    from ldm.editing import latent_mask

    return 1 - latent_mask(masks, latent_shape, cover=True)


class Restoration:
    """A measurement for the pipeline's denoising phase to explain (`LatentPipeline.restore` builds it):
    the operator, y (one row per image drawn, particles included, in [−1, 1]), the method and its
    setting (ζ, or K rows per image). `attach` wraps one batch's denoiser and returns the pair the
    sampling loop runs with: (denoiser, constraint)."""

    def __init__(self, operator: Operator, y: torch.Tensor, method: str, step: float = 0.0, iterations: int = 1,
                 particles: int = 1, sigma_y: float = 0.0):
        self.operator, self.y, self.method, self.step, self.sigma_y = operator, y, method, step, sigma_y
        self.iterations, self.particles = iterations, particles

    def attach(self, pipe, denoiser, scheduler, timesteps, rows: slice, generators):
        y = self.y[rows].to(pipe.device)
        operator = self.operator
        if isinstance(operator, PixelMask):  # one mask per image drawn (particles included), this batch's rows
            masks = operator.mask
            masks = (masks.repeat_interleave(self.particles, 0) if len(masks) > 1
                     else masks.expand(len(self.y), -1, -1, -1))
            operator = PixelMask(masks[rows].to(pipe.device))
        if self.method in ("guidance", "consistency"):
            args = (denoiser, pipe.decode_with_grad, operator, y, self.step, scheduler.alphas_cumprod,
                    scheduler.config.prediction_type)
            guided = (ReconstructionGuidance(*args) if self.method == "guidance" else
                      DataConsistency(*args, iterations=self.iterations, timesteps=timesteps, sigma_y=self.sigma_y,
                                      particles=self.particles, generators=generators))
            return guided, guided.constraint
        from ldm.editing import encode_images, fill_masked

        masks = operator.mask  # (b, 1, H, W): 1 = fill
        pictures = fill_masked(y, masks)  # the unknown pixels from their surroundings: the encoder sees no hole
        z0 = encode_images(pipe.vae, pictures.to(pipe.vae.dtype), generators).to(pipe.dtype)
        known = known_cells(masks, z0.shape[-2:])
        smc = ParticleFilter(denoiser, z0, known, timesteps, scheduler.alphas_cumprod,
                             scheduler.config.prediction_type, self.particles, generators)
        return smc, smc.constraint
