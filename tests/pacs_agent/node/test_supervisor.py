"""The one restart policy of the node's child processes, and the watch loop serve and `pe-agent worker` run."""

from __future__ import annotations

import threading

import pytest
import structlog.testing

from pacs_agent.node.supervisor import MAX_RESTARTS, RestartPolicy, watch


def test_a_dying_child_is_restarted_up_to_max_restarts_then_given_up() -> None:
    policy = RestartPolicy("worker", 2)
    with structlog.testing.capture_logs() as logs:
        assert [policy.should_restart(0, -9) for _ in range(MAX_RESTARTS)] == [True] * MAX_RESTARTS
        assert policy.should_restart(0, -9) is False
        assert policy.should_restart(0, -9) is False  # given up: asked again, still no (and logged once)
    assert policy.given_up(0) and not policy.given_up(1) and not policy.all_given_up()
    assert policy.restarts(0) == MAX_RESTARTS and policy.fatal == ""  # workers: the node keeps receiving
    kinds = [entry["event"] for entry in logs]
    assert kinds == ["worker_died"] * MAX_RESTARTS + ["worker_given_up"]


def test_an_exit_code_that_restarting_cannot_fix_is_fatal_at_once() -> None:
    policy = RestartPolicy("worker", 1, fatal_exit_codes={3: "load the model"})
    assert policy.should_restart(0, 3) is False
    assert policy.fatal == "worker 0 could not load the model; see its log line above"
    assert policy.all_given_up()


def test_a_clean_exit_is_restarted_and_logged_as_an_exit_not_a_death() -> None:
    policy = RestartPolicy("receiver_process", 1, fatal_when_given_up=True)
    with structlog.testing.capture_logs() as logs:
        assert policy.should_restart(0, 0)
    assert [(e["event"], e["log_level"]) for e in logs] == [("receiver_process_exited", "warning")]
    for _ in range(MAX_RESTARTS - 1):
        assert policy.should_restart(0, 1)
    assert not policy.should_restart(0, 1)
    assert policy.fatal == f"receiver_process 0 died {MAX_RESTARTS + 1} times (exit code 1)"


class _Children:
    def __init__(self, fatal_after: int | None) -> None:
        self.checks = 0
        self._fatal_after = fatal_after

    @property
    def fatal(self) -> str:
        return "broken" if self._fatal_after is not None and self.checks >= self._fatal_after else ""

    def check(self) -> None:
        self.checks += 1


def test_watch_returns_the_first_fatal_reason_and_checks_in_order() -> None:
    workers, receivers = _Children(None), _Children(2)
    with structlog.testing.capture_logs() as logs:
        reason = watch(threading.Event(), {"worker": workers, "receiver": receivers}, event="serve_stopping", interval=0.01)
    assert reason == "broken" and (workers.checks, receivers.checks) == (2, 2)
    assert [e["event"] for e in logs] == ["serve_stopping_on_receiver_failure"]


@pytest.mark.timeout(10)
def test_watch_ends_quietly_when_stopped_or_when_every_child_is_given_up() -> None:
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    assert watch(stop, {"worker": _Children(None)}, event="x", interval=0.01) == ""
    assert watch(threading.Event(), {"worker": _Children(None)}, event="x", interval=0.01, until=lambda: True)
