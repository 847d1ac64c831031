"""``clipdense export`` and ``clipdense push``: a trained run as a Hugging Face Hub model folder, and its upload.

``--checkpoint`` of ``segment``, ``detect`` and ``eval`` loads such a folder, or ``hf-hub:ORG/NAME``, back
(:func:`clipdense.runs.build_from_run`).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from clipdense.cli.common import CLIError, check_output

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``push``."""
    p = sub.add_parser("export", help="write a trained run as a Hugging Face Hub model folder (weights, config, "
                       "class names, model card, checksums)")  # fmt: skip
    p.add_argument("run", help="run directory written by `clipdense train`")
    p.add_argument("out", help="folder to write (empty or absent)")
    p.add_argument("--repo-id", default=None, help="ORG/NAME it will be pushed to, for the model card's usage lines")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a trained run (or an exported folder) to the Hugging Face Hub")
    p.add_argument("run", help="run directory written by `clipdense train`, or a folder `clipdense export` wrote")
    p.add_argument("repo_id", help="ORG/NAME of the Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: the repository's default)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)


def _check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id):
        raise CLIError(f"{repo_id!r} is not a Hub repository id: expected ORG/NAME, e.g. my-lab/denseclip-ade")
    return repo_id


def _check_run(run: str) -> Path:
    from clipdense.hub import is_exported_folder

    path = Path(run)
    if not path.is_dir():
        raise CLIError(f"{run} is not a folder: pass a `clipdense train` run directory")
    if not (path / "config.yaml").is_file() and not is_exported_folder(path):
        raise CLIError(f"{run} is not a run directory (no config.yaml): pass the folder `clipdense train` wrote")
    return path


def cmd_export(args: argparse.Namespace) -> None:
    """Writes OUT and prints what is in it."""
    from clipdense.hub import is_exported_folder
    from clipdense.runs import export_run

    run = _check_run(args.run)
    if is_exported_folder(run):
        raise CLIError(f"{run} is already an exported model folder: copy or push it as it is")
    repo_id = _check_repo_id(args.repo_id) if args.repo_id else None
    out = check_output(args.out, folder=True, flag="OUT")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"{out} is not empty: choose another folder, or add --overwrite")
    model = export_run(run, out, repo_id=repo_id, overwrite=args.overwrite)
    manifest = model.manifest
    print(f"exported {manifest['model']} ({manifest['task']}, {manifest['num_classes']} classes, step "
          f"{manifest['step']}) to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")  # fmt: skip
    print(f"load it with --checkpoint {out}; upload it with: clipdense push {out} ORG/NAME")


def cmd_push(args: argparse.Namespace) -> None:
    """Exports the run to a temporary folder (unless RUN is one) and uploads it; prints the commit URL."""
    from clipdense.hub import is_exported_folder, push_folder
    from clipdense.runs import export_run

    run, repo_id = _check_run(args.run), _check_repo_id(args.repo_id)
    options = dict(private=args.private, revision=args.revision, commit_message=args.message)
    if is_exported_folder(run):
        url = push_folder(run, repo_id, **options)
    else:
        with tempfile.TemporaryDirectory(prefix="clipdense-export-") as tmp:
            export_run(run, tmp, repo_id=repo_id)
            url = push_folder(tmp, repo_id, **options)
    print(f"pushed to {repo_id}: {url}")
    print(f"load it with --checkpoint hf-hub:{repo_id}")
