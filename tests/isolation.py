"""pytest plugin: tests marked ``native`` run their body in a forked child process.

A segfault (or any signal) inside llama.cpp then fails that one test with a clear message, and the
suite goes on; without it the whole pytest process dies and no other result is reported. Fixtures
are set up in the parent (so session fixtures stay shared); only the test function runs in the
child. The child uses one torch thread (a GNU OpenMP pool the parent used does not survive a fork:
that is also why llama.cpp is built with its own thread pool, not OpenMP), and a child that hangs
is killed after ``@pytest.mark.native(timeout=S)`` or ``MEDILORA_NATIVE_TIMEOUT`` seconds (900).
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "native: runs native code that can crash (llama.cpp): the test body runs "
                                       "in a forked child, a crash fails only this test")


def _child(item, w: int) -> None:
    code = 0
    try:
        import faulthandler
        faulthandler.disable()  # the parent reports the signal in one line
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        funcargs = {a: item.funcargs[a] for a in item._fixtureinfo.argnames}
        item.obj(**funcargs)
        payload = ("passed", "")
    except pytest.skip.Exception as e:
        payload = ("skipped", str(e.msg))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
        payload = ("failed", "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    try:
        data = pickle.dumps(payload)
        os.write(w, len(data).to_bytes(8, "little"))
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    except BaseException:  # noqa: BLE001
        code = 3
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("native") is None or os.environ.get("MEDILORA_NATIVE_INPROCESS") == "1":
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(pyfuncitem, w)
    os.close(w)
    marker = pyfuncitem.get_closest_marker("native")
    timeout = float(marker.kwargs.get("timeout") or os.environ.get("MEDILORA_NATIVE_TIMEOUT", "900"))
    deadline = time.monotonic() + timeout
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail(f"native test process hung: killed after {timeout:.0f} s", pytrace=False)
        time.sleep(0.05)
    data = _read_all(r)
    os.close(r)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"native crash: the test's process died with {sig} (inside native code such as llama.cpp); "
                    "the rest of the suite goes on", pytrace=False)
    if len(data) < 8:
        pytest.fail(f"native test process exited {os.WEXITSTATUS(status)} without a result", pytrace=False)
    outcome, text = pickle.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    if outcome == "skipped":  # the child's own skip, passed on
        raise pytest.skip.Exception(text, allow_module_level=False)
    if outcome == "failed":
        pytest.fail(text, pytrace=False)
    return True
