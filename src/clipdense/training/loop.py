"""The training-loop toolkit shared by the segmentation/detection engine and the CLIP pre-training.

What makes a loop reproducible and resumable, apart from its model and data order:

* RNG: :func:`seed_everything`, :func:`seed_worker` (a DataLoader ``worker_init_fn``), and
  :func:`rng_state` / :func:`restore_rng` (python, numpy, torch, CUDA);
* training state: :func:`capture_state` / :func:`restore_state` (step, RNG and the ``state_dict()`` of
  every stateful part), :func:`load_state`, and :func:`save_state` for a single state file;
* resume checks: :func:`check_resume` (saved config against the current one, naming every changed key);
* interruptions: :class:`StopRequests` (Ctrl-C and SIGTERM stop the loop at the next step boundary);
* outputs: :class:`RunLog` (``train.log``, ``metrics.jsonl`` cut back to the resumed step, TensorBoard,
  the progress bar).

Checkpoint layout: a run directory that :func:`clipdense.runs.build_from_run` rebuilds a model from
(``clipdense train``) is checkpointed with :func:`clipdense.runs.save_checkpoint` (step folders of
safetensors weights plus ``state.pt``, and a ``latest`` pointer replaced atomically); it lives in
``runs.py`` because evaluation and inference read it and may not import training. The CLIP pre-training
keeps its single ``out_dir/last.pt`` (model, optimiser, scheduler, step, RNG and config in one file),
written atomically by :func:`save_state`: its deliverable is a separate open_clip export, nothing
rebuilds a model from its checkpoint, and users, tests and the README know ``last.pt``. Moving it into
step folders would still need a ``last.pt`` beside them, i.e. two checkpoints per save. So: rebuildable
runs use ``save_checkpoint``; a resume-only state file uses ``save_state``; both are atomic, and both
hold a :func:`capture_state` dict that :func:`restore_state` reads back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import sys
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clipdense.fileio import atomic_write, atomic_write_text

# ------------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seeds python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seeds numpy and python in a worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch, and CUDA if available), loadable with ``weights_only``."""
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor, so that the checkpoint loads with weights_only=True
        "numpy": tuple(torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v for v in np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | torch.Tensor) -> None:
    """Restores what :func:`rng_state` returned (or a bare torch CPU state, as older engine checkpoints hold)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    random.setstate(state["python"])
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- training state


def capture_state(step: int, **parts: Any) -> dict[str, Any]:
    """The training state after ``step``: ``step``, ``rng`` and each part's ``state_dict()`` under its name.

    Args:
        step: Optimiser steps done.
        **parts: Objects with ``state_dict()`` (``optimizer=...``, ``scheduler=...``, ...).
    """
    return {"step": step, "rng": rng_state(), **{name: part.state_dict() for name, part in parts.items()}}


def restore_state(state: Mapping[str, Any], **parts: Any) -> int:
    """Loads each part's state dict and the RNG state from a :func:`capture_state` dict; returns its step."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    restore_rng(state["rng"])
    return int(state["step"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Writes ``state`` with ``torch.save`` atomically: ``path`` is the previous state or the new one."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Loads a saved training state on the CPU (``weights_only``: tensors and plain containers only).

    Raises:
        ValueError: The file is truncated or corrupt (the message says how to start over).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"cannot read the checkpoint {path}: it is truncated or corrupt ({str(e).splitlines()[0]}). "
            "Delete it (or resume from an older copy) to start over."
        ) from e


def check_resume(
    saved: Mapping[str, Any], current: Mapping[str, Any], source: Any, free: Collection[str] = (), hint: str = ""
) -> None:
    """Refuses to resume when a setting that shapes the trajectory changed.

    Args:
        saved: The run's config as saved, flat (``{"optim.lr": 0.1, ...}``).
        current: The config resuming it, flat; each of its keys is compared (as JSON) with ``saved``.
        source: What is resumed (run folder or checkpoint), for the message.
        free: Keys that may differ (logging intervals, worker counts, ...).
        hint: What to do instead, appended to the message.

    Raises:
        ValueError: Naming every changed key with its saved and current value.
    """
    changed = [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if key not in free and json.loads(json.dumps(saved.get(key))) != json.loads(json.dumps(value))
    ]
    if changed:
        raise ValueError(f"cannot resume {source}: the config changed ({'; '.join(changed)}). {hint}".rstrip())


# ------------------------------------------------------------------------------------------- interruptions


class StopRequests:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a request to stop at the next step boundary.

    A signal that landed mid-step and stopped the loop there would checkpoint BatchNorm statistics of a
    half-finished forward pass or a half-built optimiser state; instead the loop finishes the step, saves
    and returns, so the run resumes bit for bit. A second Ctrl-C aborts at once without saving (the last
    checkpoint stays). Handlers are installed only in the main thread and restored on exit.

    Args:
        enabled: Install the handlers (off: :attr:`requested` stays False).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
        self.signal = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this step with a checkpoint (Ctrl-C again aborts without saving)",
              file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopRequests:
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


# ------------------------------------------------------------------------------------------- outputs


@dataclass
class RunLog:
    """A run's outputs: ``train.log``, ``metrics.jsonl`` (+ TensorBoard) and the progress bar.

    A context manager. Entering attaches a ``train.log`` handler to ``logger`` (at INFO level at least)
    and starts ``metrics.jsonl`` afresh, or on resume drops its lines after ``resume_step`` (logged by an
    interrupted run after its last checkpoint). Leaving closes TensorBoard and detaches the handler,
    restoring the logger's level and propagation. Disabled (DDP ranks other than 0) it writes nothing.

    Args:
        out_dir: Run folder (created).
        logger: The loop's logger; its records also go to ``train.log``.
        resume_step: The step resumed from, or None for a fresh start.
        tensorboard: Also write scalars to ``out_dir/tensorboard`` (when tensorboard is installed).
        quiet: Keep the logger's records off the console (train.log only), e.g. under a progress bar.
        enabled: False on processes that write nothing.
    """

    out_dir: Path
    logger: logging.Logger
    resume_step: int | None = None
    tensorboard: bool = False
    quiet: bool = False
    enabled: bool = True
    writer: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._undo = contextlib.ExitStack()

    def __enter__(self) -> RunLog:
        if not self.enabled:
            return self
        logger = self.logger
        with contextlib.ExitStack() as undo:  # undone at once if the set-up fails, else when leaving
            self.out_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.out_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            undo.callback(logger.setLevel, logger.level)  # (setLevel, not .level=, clears the level cache)
            undo.callback(setattr, logger, "propagate", logger.propagate)
            undo.callback(handler.close)
            undo.callback(logger.removeHandler, handler)
            logger.addHandler(handler)
            logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
            logger.propagate = not self.quiet
            if self.resume_step is None:
                self.metrics_path.unlink(missing_ok=True)
            elif self.metrics_path.exists():
                lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
                kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.resume_step]
                atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in kept))
            if self.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    logger.info("tensorboard is not installed: logging to metrics.jsonl only")
                else:
                    self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
                    undo.callback(self.writer.close)
            self._undo = undo.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._undo.close()

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (with its ``step``) to metrics.jsonl, TensorBoard (finite numbers) and the log."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])
        self.logger.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def progress(self, total: int, initial: int, desc: str, show: bool = True) -> tqdm:
        """A step progress bar (use it in a ``with``: it closes with the loop); hidden unless enabled and ``show``."""
        hide = not (show and self.enabled)
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=hide)
