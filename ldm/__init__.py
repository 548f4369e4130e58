"""ldm: latent text-to-image diffusion — train a KL autoencoder and a text-conditioned U-Net, sample
with classifier-free guidance. `from ldm import LatentPipeline` is the entry point for sampling.

The pipeline is imported on first use, so `import ldm.data` (and the data commands) do not pay for
torch, diffusers and transformers when they do not need them.
"""

__all__ = ["LatentPipeline", "LatentPipelineOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from ldm import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
