"""Test helper, run under torchrun: ldm-train-unet in which only rank 1 receives SIGTERM, during
its second training step, as a cluster scheduler may signal a single process."""

import os
import signal
import sys

import ldm.train.unet as unet_module
from ldm.cli.train_unet import main

original, calls = unet_module.diffusion_loss, []


def diffusion_loss(*args, **kwargs):
    loss = original(*args, **kwargs)
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss


unet_module.diffusion_loss = diffusion_loss
sys.exit(main(sys.argv[1:]))
