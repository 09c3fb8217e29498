"""A Ctrl-C during an optional dependency's import is an interrupt, never "not installed"
(pm_runtime/interrupts.py; the forms an interrupted C-extension import takes are in its docstring)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time

import pytest

from pm_runtime.errors import UserError
from pm_runtime.interrupts import caused_by_interrupt, import_optional


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of `name` run `body` (what the module's initialisation does)."""

    def __init__(self, name, body):
        self.name, self.body = name, body

    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.body()


def interrupted_unchained():  # the extension prints the KeyboardInterrupt and raises its own ImportError
    try:
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: Python's handler raises KeyboardInterrupt
        time.sleep(5)
    except KeyboardInterrupt:
        pass
    raise ImportError("import numpy failed")


def interrupted_chained():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        raise ImportError("initialization failed") from e


def missing():
    raise ImportError("libcudart.so.12: cannot open shared object file")


@pytest.fixture()
def fake_module(monkeypatch):
    def install(name, body):
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(sys, "meta_path", [_Finder(name, body), *sys.meta_path])
    return install


@pytest.mark.parametrize("body", [interrupted_unchained, interrupted_chained])
def test_an_interrupted_import_is_an_interrupt(fake_module, body):
    fake_module("pm_fake_extension", body)
    with pytest.raises(KeyboardInterrupt):
        import_optional("pm_fake_extension")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_missing_or_broken_package_is_an_import_error(fake_module):
    fake_module("pm_fake_extension", missing)
    with pytest.raises(ImportError, match="libcudart"):
        import_optional("pm_fake_extension")
    with pytest.raises(ImportError):
        import_optional("pm_no_such_package_anywhere")
    assert import_optional("json") is sys.modules["json"]


def test_pm_run_says_interrupted_not_install_onnxruntime(fake_module, monkeypatch):
    """require_onnxruntime: "pip install onnxruntime" for a missing package, the interrupt for a Ctrl-C."""
    from pm_runtime.backends.onnxruntime import require_onnxruntime

    fake_module("onnxruntime", interrupted_unchained)
    with pytest.raises(KeyboardInterrupt):
        require_onnxruntime()
    fake_module("onnxruntime", missing)
    with pytest.raises(UserError, match="pip install"):
        require_onnxruntime()


def test_caused_by_interrupt_walks_the_chain():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("during handling")  # implicit context
    except ValueError as e:
        assert caused_by_interrupt(e)
    assert not caused_by_interrupt(ImportError("x")) and not caused_by_interrupt(None)
