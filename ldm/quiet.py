"""Keeping other libraries' chatter out of our output.

A command's output is its results, our progress bars and our warnings. diffusers, transformers,
huggingface_hub and bitsandbytes add loading bars, notices and warnings of their own (some about
their internals, some repeating ours less well); the console scripts silence them unless run with
`--verbose`. The Python API leaves the libraries' settings alone, except for two things ldm does
itself: trial builds of networks and schedulers (checks, not work), and importing bitsandbytes,
which on CPUs with AVX512-BF16 asks the Hugging Face Hub at import time about a 4-bit kernel ldm
never uses (a network call, and a warning when offline), and which diffusers would otherwise
import on every model load for quantized loading, which ldm never does (~3 s a process).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "bitsandbytes", "accelerate", "kernels")


def quiet_libraries() -> None:
    """For a console script: the libraries log errors only and show no progress bars; their
    Python warnings are hidden, ours (LdmWarning, raised by ldm's modules) stay. Libraries not yet
    imported are told through the environment variables they read at import, so a command that
    never uses them (ldm-shapes make) does not pay seconds to import them here."""
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for variable, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(variable, value)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("diffusers", "transformers", "huggingface_hub", "torch", "accelerate", "bitsandbytes"):
            warnings.filterwarnings("ignore", category=category, module=module)


@contextlib.contextmanager
def library_quiet():
    """Within: the libraries' warnings and log messages below errors are dropped (for trial builds
    and internal copies, whose notices would only confuse)."""
    levels = {name: logging.getLogger(name).level for name in LIBRARIES}
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


_MISSING = object()


def import_bitsandbytes_offline() -> None:
    """Import bitsandbytes, if installed and not yet imported, without its import-time Hub lookup.

    bitsandbytes (0.50) tries `kernels.get_kernel("kernels-community/quantization-bitsandbytes")`
    when the CPU has AVX512-BF16, which asks the Hub whether the publisher is trusted, and logs a
    warning when it cannot. With `kernels` hidden for the import it takes its own fallback at once.
    diffusers imports bitsandbytes whenever it is installed, so ldm imports it first, this way."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    saved = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    try:
        with library_quiet():
            import bitsandbytes  # noqa: F401
    except ImportError:
        pass  # a broken installation: diffusers sees it as absent too
    finally:
        if saved is _MISSING:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


def diffusers_without_bitsandbytes() -> None:
    """Import diffusers' quantizers as if bitsandbytes were absent. diffusers imports bitsandbytes
    with them whenever it is installed (diffusers/quantizers/bitsandbytes/utils.py), for loading
    bitsandbytes-quantized models, which ldm never does; the import costs ~3 s a process (it pulls
    in torch.compile's machinery) and the Hub lookup above. A model folder that asks for such
    quantization then fails to load, as ldm means it to. ldm's 8-bit AdamW imports bitsandbytes
    itself (`import_bitsandbytes_offline`). With another diffusers, nothing is changed."""
    if "diffusers.quantizers" in sys.modules:
        return
    from diffusers.utils import import_utils

    if not isinstance(getattr(import_utils, "_bitsandbytes_available", None), bool):
        return
    saved = import_utils._bitsandbytes_available
    import_utils._bitsandbytes_available = False
    try:
        import diffusers.quantizers  # noqa: F401
    finally:
        import_utils._bitsandbytes_available = saved
