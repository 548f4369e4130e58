"""What every console script shares: one-line errors with exit status 2, never a traceback.

Bad input is the user's problem to fix, so it gets one line saying what is wrong and how to fix
it. A bug in `ldm` still shows its traceback: hiding those would make them impossible to report.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

# Errors that mean "the input is wrong", raised by the Python API with a message meant for people.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: ...`) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", prog=self.prog)


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Print `prog: error: message` on one line to stderr and exit with status 2."""
    prog = prog or _prog()
    one_line = " ".join(str(message).split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Call `main(argv)`, turning the API's user errors into one line and exit status 2.

    `prog` names the command in messages (default: the running script's name).
    """
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        message = e.strerror + f": {e.filename}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        fail(message, prog=prog)
    except KeyboardInterrupt:
        print(f"{prog or _prog()}: interrupted", file=sys.stderr)
        return 130


def _prog() -> str:
    import os

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ldm"
