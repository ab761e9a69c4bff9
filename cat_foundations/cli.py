"""One error-handling and exit-code convention for every cat-tokenizer command.

Exit codes (``cat-tokenize``, ``cat-train``, ``cat-bench``, ``cat-router``):

* ``0`` (:data:`EXIT_OK`)      everything asked for was done;
* ``2`` (:data:`EXIT_PARTIAL`) the command finished but some items failed (they are listed,
  e.g. in ``errors.jsonl`` or on stderr);
* ``1`` (:data:`EXIT_FATAL`)   nothing useful was done: bad arguments, unreadable input,
  unwritable output, a model that cannot load, an interrupt. Reported as ONE line on stderr,
  ``<prog>: error: <message>``; set ``CAT_TOKENIZER_DEBUG=1`` for the traceback.

A command's body returns ``EXIT_OK`` / ``EXIT_PARTIAL`` and raises :class:`FatalError` (or lets
any other exception escape) for a fatal error; :func:`run_cli` turns that into the code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_PARTIAL = 2
DEBUG_ENV = "CAT_TOKENIZER_DEBUG"
_LEGACY_DEBUG_ENVS = ("CAT_TOKENIZE_DEBUG",)


class FatalError(Exception):
    """Stops a command with exit code 1 and a one-line message."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a :class:`FatalError` (exit 1, one line)."""

    def error(self, message):
        raise FatalError(f"{message} (see {self.prog} --help)")


def _debugging() -> bool:
    return any(os.environ.get(name) for name in (DEBUG_ENV, *_LEGACY_DEBUG_ENVS))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or "no message"


def run_cli(prog: str, body: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command's ``body`` and return its exit code under the convention above.

    Args:
        prog: the command's name, the prefix of every error line.
        body: does the work; returns 0 or 2 (``None`` counts as 0) or raises.
        interrupted: the message for Ctrl-C (e.g. what is kept and how to resume).
    """
    try:
        code = body()
    except FatalError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_FATAL
    except SystemExit as error:  # argparse --help (code 0) or a library's sys.exit
        if error.code in (None, 0):
            return EXIT_OK
        if isinstance(error.code, int):
            return EXIT_FATAL
        print(f"{prog}: error: {error.code}", file=sys.stderr)
        return EXIT_FATAL
    except Exception as error:
        if _debugging():
            raise
        print(
            f"{prog}: error: {type(error).__name__}: {_one_line(error)} ({DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FATAL
    return EXIT_OK if code is None else int(code)
