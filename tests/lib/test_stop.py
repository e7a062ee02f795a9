"""SIGINT/SIGTERM: one request stops after the step, a copy of it is not "stop now", a save is never cut short."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from lib import stop as stop_module
from lib.stop import Interrupted, StopRequest



@pytest.fixture
def stop():
    request = StopRequest()
    yield request
    request.restore()


def _signal(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # let the interpreter run the handler


def test_one_signal_stops_after_the_step(stop):
    stop.check()
    _signal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"):
        stop.check()


def test_the_same_signal_twice_at_once_is_one_request(stop):
    # make forwards SIGTERM to its child when the process group gets it: two copies within milliseconds.
    try:
        _signal(signal.SIGTERM)
        _signal(signal.SIGTERM)
    except KeyboardInterrupt:  # would abort the whole pytest session: turn it into this test's failure
        pytest.fail("a copy of the same SIGTERM was taken for 'stop now'")
    with pytest.raises(Interrupted):
        stop.check()


def test_a_later_or_different_second_signal_means_stop_now(stop, monkeypatch):
    _signal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        _signal(signal.SIGINT)
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", 0.0)  # the same signal, but after the window
    with pytest.raises(KeyboardInterrupt):
        _signal(signal.SIGTERM)


def test_a_save_is_never_cut_short_and_stop_now_follows_it(stop):
    _signal(signal.SIGTERM)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with stop.saving():
            _signal(signal.SIGINT)  # "stop now" while the checkpoint is written
            done.append("checkpoint written")
    assert done == ["checkpoint written"]


def test_once_finishing_signals_are_only_noted(stop):
    _signal(signal.SIGTERM)
    stop.finishing()
    _signal(signal.SIGINT)
    _signal(signal.SIGTERM)
    with pytest.raises(Interrupted):
        stop.check()


def test_a_checkpoint_written_while_finishing_does_not_end_the_finishing(stop):
    _signal(signal.SIGTERM)
    stop.finishing()
    with stop.saving():  # the final checkpoint
        pass
    try:
        _signal(signal.SIGINT)  # while the summary is written
    except KeyboardInterrupt:  # would abort the whole pytest session: turn it into this test's failure
        pytest.fail("a signal cut the final summary short")


def test_under_ddp_the_agreed_flag_decides_not_the_local_signal(stop):
    # Ranks stop at the same step: the flag reduced with the step's loss, not what this rank saw.
    stop.check(anywhere=False)
    with pytest.raises(Interrupted, match="another rank"):
        stop.check(anywhere=True)
    _signal(signal.SIGTERM)
    stop.check(anywhere=False)  # this rank's signal arrived after the step's reduction: next step
    with pytest.raises(Interrupted, match="SIGTERM"):
        stop.check(anywhere=True)
