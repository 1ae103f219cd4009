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
    stopping._seen = False


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


def test_a_second_ctrl_c_after_the_first_was_raised_stops_at_once(handlers):
    """The first Ctrl-C was raised at a safe point and the trial is being failed: another one does not wait."""
    with pytest.raises(KeyboardInterrupt):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                stopping.check()
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second Ctrl-C did not stop")


def test_a_repeated_sigterm_stays_deferred(handlers):
    """A scheduler signals the whole process group and precondtune passes SIGTERM on to its workers: a worker that
    gets it twice still stops at a safe point."""
    reached = []
    with pytest.raises(stopping.Terminated):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after both")
            stopping.check()
    assert reached == ["after both"]


def test_nothing_carries_over_to_the_next_region(handlers):
    with pytest.raises(ValueError):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # recorded, then the region ends with another error
            raise ValueError("the trial failed on its own")
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with stopping.deferred():  # the next search in this process starts clean: its first Ctrl-C waits too
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("waited for check()")
            stopping.check()
    assert reached == ["waited for check()"]


def test_training_stops_at_the_step_after_the_signal(handlers):
    """Inside a search, a Ctrl-C during step k stops the run before step k+1: train() checks between steps."""
    from conftest import load_example

    from precondtune.training import Schedule, prepare, train

    data = prepare(load_example("mlp"), steps=10, batch_size=4)
    reported = []

    def report(step, value):
        reported.append(step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised: the report's storage write would finish
        return None

    with pytest.raises(KeyboardInterrupt):
        with stopping.deferred():
            train(data, "adamw", {}, schedule=Schedule(10), report_every=1, callback=report)
    assert reported == [1, 2, 3]
