"""The training-loop toolkit: RNG round trips, training state, resume checks, run outputs."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from clipdense.training.loop import (
    RunLog,
    capture_state,
    check_resume,
    load_state,
    restore_rng,
    restore_state,
    rng_state,
    save_state,
    seed_everything,
    seed_worker,
)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_round_trip_through_a_saved_file_reproduces_the_draws(tmp_path):
    seed_everything(7)
    _draws()
    save_state(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = [_draws() for _ in range(3)]
    seed_everything(123)  # elsewhere in every generator
    restore_rng(load_state(tmp_path / "rng.pt")["rng"])  # weights_only load
    assert [_draws() for _ in range(3)] == expected
    assert [p.name for p in tmp_path.iterdir()] == ["rng.pt"]  # no temporary file left behind


def test_seeding_is_deterministic_and_restore_accepts_a_bare_torch_state():
    seed_everything(3)
    first = _draws()
    seed_everything(3)
    assert _draws() == first
    state = torch.get_rng_state()  # what older engine checkpoints saved as "rng"
    expected = torch.rand(4)
    torch.rand(10)
    restore_rng(state)
    assert torch.equal(torch.rand(4), expected)


def test_seed_worker_seeds_numpy_and_python_from_torch():
    torch.manual_seed(11)
    seed_worker(0)
    a = (random.random(), float(np.random.rand()))
    torch.manual_seed(11)
    seed_worker(5)  # the worker id does not matter: torch's seed does
    assert (random.random(), float(np.random.rand())) == a


def test_training_state_round_trip_continues_the_same_trajectory(tmp_path):
    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def steps(model, opt, sched, n):
        out = []
        for _ in range(n):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            out.append(loss.item())
        return out

    model, opt, sched = setup()
    full = steps(model, opt, sched, 6)
    model, opt, sched = setup()
    first = steps(model, opt, sched, 3)
    save_state(tmp_path / "last.pt", {**capture_state(3, model=model, optimizer=opt, scheduler=sched), "extra": 1})
    seed_everything(99)
    model, opt, sched = setup()
    state = load_state(tmp_path / "last.pt")
    assert restore_state(state, model=model, optimizer=opt, scheduler=sched) == 3 and state["extra"] == 1
    assert first + steps(model, opt, sched, 3) == full  # bitwise equal


def test_check_resume_names_every_changed_key_and_skips_free_ones():
    saved = {"optim.lr": 0.1, "train.log_every": 10, "data.scale": [512, 128], "model.name": "a"}
    check_resume(saved, {**saved, "train.log_every": 50, "data.scale": (512, 128)}, "run", free={"train.log_every"})
    with pytest.raises(ValueError) as error:
        check_resume(saved, {**saved, "optim.lr": 0.5, "model.name": "b"}, "runs/x", hint="Start over.")
    message = str(error.value)
    assert message.startswith("cannot resume runs/x: the config changed")
    assert "optim.lr: 0.1 -> 0.5" in message and "model.name: 'a' -> 'b'" in message
    assert "log_every" not in message and message.endswith("Start over.")
    with pytest.raises(ValueError, match="new_key: None -> 1"):  # a key the saved config lacks
        check_resume(saved, {"new_key": 1}, "run")


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_log_truncates_metrics_to_the_resume_step(tmp_path):
    logger = logging.getLogger("clipdense.test_loop")
    with RunLog(tmp_path, logger) as log:
        for step in range(1, 9):
            log.write({"step": step, "loss": 1.0 / step})
        log.write({"event": "note"})  # no step: counts as step 0
    assert len(_metrics(tmp_path / "metrics.jsonl")) == 9
    with RunLog(tmp_path, logger, resume_step=5) as log:
        assert [r.get("step") for r in _metrics(log.metrics_path)] == [1, 2, 3, 4, 5, None]
        log.write({"step": 6, "loss": 0.5})
    assert [r.get("step") for r in _metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, None, 6]
    with RunLog(tmp_path, logger):  # a fresh start drops the old metrics
        assert not (tmp_path / "metrics.jsonl").exists()


def test_run_log_attaches_and_detaches_train_log(tmp_path):
    logger = logging.getLogger("clipdense.test_loop.handlers")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with RunLog(tmp_path / "run", logger, quiet=True) as log:
        assert logger.propagate is False and logger.getEffectiveLevel() <= logging.INFO
        log.write({"step": 1, "loss": 0.123456789})
        with log.progress(10, 0, "test", show=False) as bar:
            bar.update(1)
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert "step=1 loss=0.12346" in (tmp_path / "run" / "train.log").read_text()
    with RunLog(tmp_path / "rank1", logger, enabled=False) as log:
        log.write({"step": 1})
        assert log.progress(10, 0, "test").disable
    assert not (tmp_path / "rank1").exists() and list(logger.handlers) == before[2]
