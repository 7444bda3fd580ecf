"""Per-thread on/off settings of the eager forward, each with a default from the environment.

`ThreadSwitch(env)` reads its environment variable once at import (the forward must not pay for an
environment lookup per call): on unless set to 0 / false / no / off. `switch(enabled)` is a
context manager that sets it in this thread and restores it on exit; `switch.enabled()` reads it.
"""
from __future__ import annotations

import contextlib
import os
import threading

_OFF = ("0", "false", "no", "off")


class ThreadSwitch:
    def __init__(self, env: str):
        self.env = env
        self.default = os.environ.get(env, "1").strip().lower() not in _OFF
        self._state = threading.local()

    def enabled(self) -> bool:
        return getattr(self._state, "enabled", self.default)

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True):
        previous = self.enabled()
        self._state.enabled = bool(enabled)
        try:
            yield
        finally:
            self._state.enabled = previous
