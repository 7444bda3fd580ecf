"""switches.py: per-thread switches with an environment default."""
import threading

from inductor_w4a8.switches import ThreadSwitch


def test_environment_default_read_at_construction(monkeypatch):
    for value, expected in (("0", False), ("off", False), (" False ", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("W4A8_TEST_SWITCH", value)
        assert ThreadSwitch("W4A8_TEST_SWITCH").enabled() is expected, value
    monkeypatch.delenv("W4A8_TEST_SWITCH")
    assert ThreadSwitch("W4A8_TEST_SWITCH").enabled() is True


def test_nests_restores_and_is_per_thread():
    switch = ThreadSwitch("W4A8_TEST_SWITCH_UNSET")
    seen = []
    with switch(False):
        assert not switch.enabled()
        with switch(True):
            assert switch.enabled()
        assert not switch.enabled()
        worker = threading.Thread(target=lambda: seen.append(switch.enabled()))
        worker.start()
        worker.join()
    assert switch.enabled() and seen == [True]   # another thread keeps the default
