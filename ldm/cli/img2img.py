"""ldm-img2img: edit a picture with a latent diffusion model (SDEdit), the same way ldm-txt2img draws.

Prints the path of each PNG it writes on stdout, one per line; progress and warnings go to stderr.
Every flag of ldm-txt2img works here too; every setting is checked before any weights load.
"""

from __future__ import annotations

import sys

from ldm.cli.common import run
from ldm.cli.txt2img import _main


def main(argv=None) -> int:
    return run(lambda args: _main(args, editing=True), argv, prog="ldm-img2img")


if __name__ == "__main__":
    sys.exit(main())
