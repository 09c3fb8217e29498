"""Telling a Ctrl-C from a failure where a C extension hides it.

A Ctrl-C that lands while a C extension is being imported can come back as an ImportError: sending
SIGINT into `import onnxruntime.capi._pybind_state` in fresh processes gave "ImportError: import
numpy failed" with nothing attached (8-48 ms into the import) or "ImportError: initialization
failed" raised from the KeyboardInterrupt (72-88 ms). Code that treats an ImportError as "not
installed" (or, in pm-export's optimiser, as "fusion failed, ship the plain graph") must not read
an interrupted import that way: `import_optional` and `noticing_interrupts` tell them apart.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading


@contextlib.contextmanager
def noticing_interrupts():
    """Yields a list that records every SIGINT arriving inside the block; the interrupt still raises
    KeyboardInterrupt as usual (where a C extension swallows that, the list still says it came). Only in
    the main thread and over Python's own Ctrl-C handler (not where SIGINT is ignored or taken by
    someone else); elsewhere the list stays empty."""
    seen: list[bool] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield seen
        return

    def handler(signum, frame):
        seen.append(True)
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def caused_by_interrupt(e: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is in e's cause/context chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def import_optional(name: str):
    """importlib.import_module(name) for an optional dependency: ImportError where it is missing or
    broken, KeyboardInterrupt where a Ctrl-C arrived during the import (whatever the extension made of
    it), so that callers saying "not installed" on ImportError never say it to a user who pressed
    Ctrl-C."""
    with noticing_interrupts() as interrupted:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            if interrupted or caused_by_interrupt(e):
                raise KeyboardInterrupt from e
            raise


__all__ = ["caused_by_interrupt", "import_optional", "noticing_interrupts"]
