"""The ``clipdense`` command line: one module per command group, each command a thin layer over the library.

=================  ==================================================  =======================
module             commands                                            library
=================  ==================================================  =======================
``segment``        ``segment``, ``detect``                             ``clipdense.inference``
``zeroshot``       ``eval-zeroshot``, ``robustness``                   ``clipdense.evaluation``
``train``          ``train``, ``eval``, ``flops``                      ``clipdense.training``,
                                                                       ``clipdense.evaluation``
``datasets``       ``check-dataset``                                   ``clipdense.data``
``shapesworld``    ``demo``, ``shapesworld generate|train|evaluate``   ``clipdense.evaluation``
``common``         shared flags, input checks, file writing
=================  ==================================================  =======================

A command parses and checks its arguments, calls the library function a Python user would call, then
prints and writes files. Heavy imports (torch, open_clip) happen inside the commands, so that importing
this package stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from clipdense import __version__
from clipdense.cli import datasets, segment, shapesworld, train, zeroshot
from clipdense.cli.common import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``func``, the command to run on the parsed arguments."""
    parser = argparse.ArgumentParser(prog="clipdense", description="Language-guided dense prediction with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    parser.add_argument("--version", action="version", version=f"clipdense {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (segment, zeroshot, train, datasets, shapesworld):  # the order of `clipdense --help`
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (1 and a one-line message on a user error)."""
    from clipdense.clip.loading import CLIPLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:2] == ["shapesworld", "train"]:  # its own parser, options and --help included
            from clipdense.training.clip_pretrain import main as pretrain_main

            return pretrain_main(argv[2:])
        args = build_parser().parse_args(argv)
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(message)s")
        code = args.func(args)
    except (CLIError, CLIPLoadError, ValueError, FileNotFoundError) as e:
        print(f"clipdense: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # training turns the first Ctrl-C into a checkpointed stop; this is a second one
        print("clipdense: interrupted (a training run keeps its last checkpoint: --resume continues)", file=sys.stderr)
        return 130
    return code or 0
