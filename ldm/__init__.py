"""ldm: latent text-to-image diffusion — train a KL autoencoder and a text-conditioned U-Net, sample
with classifier-free guidance. `from ldm import LatentPipeline` is the entry point for sampling.

The pipeline is imported on first use, so `import ldm.data` (and the data commands) do not pay for
torch, diffusers and transformers when they do not need them.
"""

import logging

__all__ = ["LatentPipeline", "LatentPipelineOutput"]

# diffusers imports bitsandbytes whenever it is installed (for its quantizers), and bitsandbytes'
# CPU backend then warns that an optional 4-bit matmul kernel package is missing. ldm uses only its
# 8-bit optimizer (optim.optimizer=adamw8bit), which does not need that package: the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from ldm import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
