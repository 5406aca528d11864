"""What every command line shares: one-line user errors, the argument parser, logging setup, and the
stderr progress bar (training and the teacher-reply fill use it too).

`cli.py` (train/export/generate and the `snn-distill` dispatcher) and `evaluate_cli.py` both import
from here, so neither imports the other at module level. Torch-free on import.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """Raised for bad input that the CLI reports as one line."""


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ... (see PROG --help)`), exit code 2."""

    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _int_at_least(s: str, low: int, what: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
    return v


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(s, 1, "a positive integer")


def non_negative_int(s: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(s, 0, ">= 0")


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
    """A tqdm bar on stderr (stdout stays clean); `enabled=False` gives a silent one."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )


def setup_logging(quiet: bool = False) -> None:
    """Logs go to stderr (stdout stays clean for generated text and results)."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    import warnings

    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .artifacts import ArtifactError
    from .data import DataError
    from .distill import TrainingError
    from .teacher import TeacherError

    errors: list[type[BaseException]] = [
        UserError,
        ValueError,
        ArtifactError,
        DataError,
        TeacherError,
        TrainingError,
        FileNotFoundError,
    ]
    try:
        from .export.onnx import ExportError

        errors.append(ExportError)
    except ImportError:
        pass
    return tuple(errors)


def run_guarded(fn: Callable[..., object], *args: object) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    try:
        fn(*args)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))  # 130/143: stopped by SIGINT/SIGTERM after a checkpoint
    except (OSError, RuntimeError, MemoryError) as e:  # a full disk or memory anywhere else: one line too
        from .failures import disk_full_message, generic_out_of_memory_message, is_disk_full, is_out_of_memory

        if is_disk_full(e):
            print(f"error: {disk_full_message(e)}", file=sys.stderr)
        elif is_out_of_memory(e):
            print(f"error: {generic_out_of_memory_message(e)}", file=sys.stderr)
        else:
            raise
        return 2
