"""pynetdicom's 1 ms idle polls are capped while a Receiver runs, and restored when it stops."""

from __future__ import annotations

import time
from collections.abc import Callable

import pynetdicom.association
import pynetdicom.dul
import pytest
from pydicom.uid import generate_uid

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.pynetdicom_tuning import (
    SleepCap,
    cap_pynetdicom_sleeps,
    pynetdicom_sleeps_capped,
    restore_pynetdicom_sleeps,
)
from pacs_agent.receiver import Receiver
from pacs_agent.settings import Settings
from tests.pacs_agent.test_receiver import ct_slice, scu


def _sleep_seconds(module: object, seconds: float, repeat: int = 20) -> float:
    """Mean wall time of ``module.time.sleep(seconds)``."""
    started = time.perf_counter()
    for _ in range(repeat):
        module.time.sleep(seconds)  # type: ignore[attr-defined]
    return (time.perf_counter() - started) / repeat


@pytest.fixture(autouse=True)
def _restored() -> object:
    yield
    restore_pynetdicom_sleeps()


def test_cap_shortens_pynetdicom_sleeps_and_keeps_the_rest_of_time() -> None:
    assert not pynetdicom_sleeps_capped()
    assert _sleep_seconds(pynetdicom.dul, 0.01, repeat=3) >= 0.009
    cap_pynetdicom_sleeps(0.0002)
    assert pynetdicom_sleeps_capped()
    for module in (pynetdicom.dul, pynetdicom.association):
        assert _sleep_seconds(module, 0.01) < 0.004
        assert module.time.monotonic() == pytest.approx(time.monotonic(), abs=1.0)  # type: ignore[attr-defined]
    assert time.sleep is not pynetdicom.dul.time.sleep  # type: ignore[attr-defined]  # the real module is untouched
    restore_pynetdicom_sleeps()
    assert pynetdicom.dul.time is time and pynetdicom.association.time is time  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        cap_pynetdicom_sleeps(0)


def test_sleep_cap_is_on_while_any_user_holds_it() -> None:
    cap = SleepCap(0.0002)
    cap.acquire()
    cap.acquire()
    assert pynetdicom_sleeps_capped()
    cap.release()
    assert pynetdicom_sleeps_capped()
    cap.release()
    assert not pynetdicom_sleeps_capped()


def test_receiver_caps_while_running_and_restores_on_stop(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    receiver = Receiver(settings, make_session_factory(engine))
    assert not pynetdicom_sleeps_capped()
    receiver.start()
    try:
        assert pynetdicom_sleeps_capped()
        assoc = scu().associate("127.0.0.1", receiver.port, ae_title="PE_AGENT")
        assert assoc.is_established
        study, series = generate_uid(), generate_uid()
        assert [assoc.send_c_store(ct_slice(study, series, i)).Status for i in range(3)] == [0, 0, 0]
        assoc.release()
    finally:
        receiver.stop()
        engine.dispose()
    assert not pynetdicom_sleeps_capped()
