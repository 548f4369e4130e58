"""ldm: latent text-to-image diffusion — train a KL autoencoder and a text-conditioned U-Net, sample
with classifier-free guidance. `from ldm import LatentPipeline` is the entry point for sampling."""

from ldm.pipeline import LatentPipeline, LatentPipelineOutput

__all__ = ["LatentPipeline", "LatentPipelineOutput"]
__version__ = "0.1.0"
