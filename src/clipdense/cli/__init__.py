"""The ``clipdense`` command line: one module per command group, each command a thin layer over the library.

=================  ==================================================  =======================
module             commands                                            library
=================  ==================================================  =======================
``segment``        ``segment``, ``detect``                             ``clipdense.inference``
``zeroshot``       ``eval-zeroshot``, ``robustness``                   ``clipdense.evaluation``
``train``          ``train``, ``eval``, ``flops``                      ``clipdense.training``,
                                                                       ``clipdense.evaluation``
``fewshot``        ``fewshot train|eval|grid``, ``classify``           ``clipdense.training``,
                                                                       ``clipdense.evaluation``
``datasets``       ``check-dataset``                                   ``clipdense.data``
``shapesworld``    ``demo``, ``shapesworld generate|train|evaluate``   ``clipdense.evaluation``
``hub``            ``export``, ``push``                                ``clipdense.runs``, ``clipdense.hub``
``app``            ``app`` (Gradio web demo)                           ``clipdense.inference``
``common``         shared flags, input checks, file writing
=================  ==================================================  =======================

A command parses and checks its arguments, calls the library function a Python user would call, then
prints and writes files. Heavy imports (torch, open_clip) happen inside the commands, so that importing
this package stays quick.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import traceback
from collections.abc import Sequence

from clipdense import __version__
from clipdense.cli import app, datasets, fewshot, hub, segment, shapesworld, train, zeroshot
from clipdense.cli.common import CLIError, Parser, check_device

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``func``, the command to run on the parsed arguments."""
    parser = Parser(prog="clipdense", description="Language-guided dense prediction with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details; tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"clipdense {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (segment, zeroshot, train, fewshot, hub, datasets, shapesworld, app):  # `clipdense --help` order
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    0: done. 1: the command failed on its inputs (unreadable data, weights not found) or on an unexpected
    error. 2: a usage error found before any work (a flag, argument, path or config value that cannot
    work). 3: ``train`` stopped early, resumable. 130: interrupted. Errors are one line on stderr; ``-v``
    adds the traceback.
    """
    from clipdense.config import ConfigError

    if argv is None:  # the `clipdense` command: the process ends after this call
        try:
            return main(sys.argv[1:])
        finally:
            # Interpreter teardown would garbage-collect torch's module graph (~1 s of a 4 s run): the
            # objects alive now are left to the OS; atexit handlers and buffered output still run.
            gc.freeze()
    argv = list(argv)
    verbose = bool({"-v", "--verbose"} & set(argv))
    try:
        if argv[:2] == ["shapesworld", "train"]:  # its own parser, options and --help included
            from clipdense.training.clip_pretrain import main as pretrain_main

            return pretrain_main(argv[2:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version or a usage error, which argparse has printed
            return e.code if isinstance(e.code, int) else 2
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
        if hasattr(args, "device"):
            args.device = check_device(args.device)
        code = args.func(args)
    except (CLIError, ConfigError) as e:
        return _fail(f"clipdense: error: {e}", 2, verbose)
    except (ValueError, OSError, ImportError) as e:  # ImportError: an optional package is missing
        return _fail(f"clipdense: error: {e}", 1, verbose)
    except KeyboardInterrupt:  # training turns the first Ctrl-C into a checkpointed stop; this is a second one
        print("clipdense: interrupted (a training run keeps its last checkpoint: --resume continues)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, unless it is CLIPLoadError (not imported above: it would import open_clip)
        loading = sys.modules.get("clipdense.clip.loading")
        if loading is not None and isinstance(e, loading.CLIPLoadError):
            return _fail(f"clipdense: error: {e}", 1, verbose)
        report = "please report it with the traceback" + ("" if verbose else " that -v prints")
        return _fail(f"clipdense: unexpected error: {type(e).__name__}: {e} ({report})", 1, verbose)
    return code or 0


def _fail(message: str, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(" ".join(message.split()), file=sys.stderr)  # one line, whatever the exception's text holds
    return code
