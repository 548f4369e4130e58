"""What every console script shares: one-line errors with exit status 2, never a traceback.

Bad input is the user's problem to fix, so it gets one line saying what is wrong and how to fix
it. A bug in `ldm` still shows its traceback: hiding those would make them impossible to report.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, NoReturn, Sequence

# Errors that mean "the input is wrong", raised by the Python API with a message meant for people.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

EXIT_USAGE = 2
EXIT_NO_SPACE = 74  # sysexits.h EX_IOERR: the disk filled up; what was already written is kept
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, once: not when the help already names it ("default:
    random ..."), and not when there is none to show (None, an off switch, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: ...`) and exit status 2; every
    command takes --verbose, without which other libraries' chatter is silenced (ldm.quiet) and
    warnings are one line each (`prog: warning: ...`)."""

    top_level = True  # sub-commands' parsers (ldm-shapes eval) share their command's --verbose

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.top_level:
            self.add_argument("--verbose", action="store_true",
                              help="also show other libraries' messages (loading bars, notices)")

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", _SubcommandParser)
        return super().add_subparsers(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        if self.top_level:
            _set_output(self.prog, verbose=namespace.verbose)
        return namespace, rest

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", prog=self.prog)


class _SubcommandParser(ArgumentParser):
    top_level = False


def _set_output(prog: str, verbose: bool) -> None:
    """What a command prints besides its results: our warnings as one line each, and, unless
    verbose, nothing from other libraries."""
    import warnings

    from ldm.quiet import quiet_libraries

    if not verbose:
        quiet_libraries()
    warnings.formatwarning = lambda message, category, *a, **k: f"{prog}: warning: {message}\n"


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
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        print(f"{prog or _prog()}: error: {no_space_message(e)}", file=sys.stderr)
        return EXIT_NO_SPACE
    except KeyboardInterrupt:
        print(f"{prog or _prog()}: interrupted", file=sys.stderr)
        return 130


def no_space_message(error: Exception) -> str:
    """One line for a full disk: what could not be written, and how much room is left there."""
    import shutil
    from pathlib import Path

    where = Path(error.filename) if getattr(error, "filename", None) else None
    free = ""
    if where is not None:
        folder = next((p for p in (where, *where.parents) if p.is_dir()), None)
        if folder is not None:
            free = f" ({shutil.disk_usage(folder).free / 2**20:,.0f} MB free in {folder})"
    return f"no space left on device{f' writing {where}' if where else ''}{free}; free space and run again"


def _prog() -> str:
    import os

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ldm"


# ---- what the two training commands share ---------------------------------------------------------

TRAINING_EXIT_STATUSES = (
    "Exit status: 0 done; 2 bad input; 3 too many non-finite steps in a row (run.max_bad_steps); "
    "74 a checkpoint could not be written (disk full); 75 stopped by SIGTERM/SIGINT after saving a checkpoint "
    "(rerun with --resume latest)."
)


def add_training_arguments(p: ArgumentParser, presets: str, config_class: str, override_example: str) -> None:
    """--config, --data, --output-dir, --max-steps, --resume and key=value overrides."""
    p.add_argument("--config", required=True, help=f"a YAML preset ({presets}); keys map 1:1 onto {config_class}")
    p.add_argument("--data", help="training data (folder, metadata.jsonl/csv, tar shards); sets data.path")
    p.add_argument("--output-dir", help="run folder for checkpoints, samples, metrics and final/; sets run.output_dir")
    p.add_argument("--max-steps", type=int, help="optimizer updates; sets run.max_steps")
    p.add_argument("--resume", metavar="latest|DIR", help="continue exactly from the newest checkpoint of the output folder, or from a checkpoint folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides with dotted keys, values as YAML (e.g. {override_example})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_training_config(config_class, args, **paths):
    """The config from --config and the overrides, then the flags. Flags are set directly rather
    than as overrides: a path stays a string even where YAML would read it otherwise ("2024", "yes").
    `paths` maps further config attributes to flag values (e.g. vae=args.vae)."""
    from ldm.config import load_config

    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    config = load_config(config_class, args.config, args.overrides)
    for attribute, value in {"data.path": args.data, "run.output_dir": args.output_dir, "run.max_steps": args.max_steps, **paths}.items():
        if value is not None:
            *parents, name = attribute.split(".")
            target = config
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, name, value)
    return config


def run_training(train: Callable[[], object], prog: str) -> int:
    """Run `train()`, print its result (OUTPUT/final); an early stop is one line and its exit status."""
    import logging

    from ldm.train.guards import RunStopped, report_stop

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = train()
    except RunStopped as stopped:  # a signal (75: resume me), a diverged run (3), a failed save (74): one line
        return leave(report_stop(stopped, prog))
    except Exception as e:  # the disk filled up outside a checkpoint (the final pipeline, a sample grid)
        from ldm.train.checkpoint import io_error_code

        if io_error_code(e) not in NO_SPACE:
            raise
        message = f"{no_space_message(e)}; the last checkpoint is intact, rerun with --resume latest"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_NO_SPACE
    print(result)
    return leave(0)


def leave(status: int) -> int:
    """`status`; a worker of a distributed run (torchrun, accelerate launch: WORLD_SIZE > 1) instead ends
    here, output flushed, with os._exit(status). Everything the run writes is written and closed by now,
    but the interpreter's teardown is not safe under gloo: a worker thread of a process group that wakes
    after finalisation has begun dies taking the GIL ("terminate called without an active exception",
    SIGABRT; pytorch#190489, #179291), and torchrun then reports a finished run as failed (seen once
    in CI on the 2-process stage-1 test). Skipping the teardown skips that. In-process callers of a
    single-process run get `status` back."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return status
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
