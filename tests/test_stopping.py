"""Ctrl-C and SIGTERM: deferred to a safe point inside a search, at once outside it."""
import os
import signal

import pytest

from precondtune import stopping


@pytest.fixture
def handlers():
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopping.install()
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])
    stopping._pending.clear()


def test_outside_a_search_a_signal_raises_at_once(handlers):
    with pytest.raises(KeyboardInterrupt) as e:
        os.kill(os.getpid(), signal.SIGINT)
    assert not isinstance(e.value, stopping.Terminated)
    with pytest.raises(stopping.Terminated):
        os.kill(os.getpid(), signal.SIGTERM)


def test_inside_deferred_the_first_signal_waits_for_check(handlers):
    reached = []
    with pytest.raises(stopping.Terminated):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the signal")  # no exception yet: a storage write here would finish
            stopping.check()
            reached.append("after check")
    assert reached == ["after the signal"]
    stopping.check()  # nothing left pending


def test_a_second_signal_raises_at_once(handlers):
    with pytest.raises(KeyboardInterrupt):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second Ctrl-C did not stop")
    assert not stopping._pending


def test_a_signal_pending_at_the_end_of_the_region_is_raised(handlers):
    with pytest.raises(KeyboardInterrupt):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGINT)
