"""Shared fixtures: no test may leave a thread or a child process behind."""

import os
import shutil
import tempfile
import threading

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_data_folder():
    """Nodes started by tests (and their child processes) keep history in a folder of the run's
    own, never in the user's data folder (Linux and Windows name it by these variables)."""
    folder = tempfile.mkdtemp(prefix="meshchat-tests-")
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "LOCALAPPDATA")}
    os.environ["XDG_DATA_HOME"] = os.environ["LOCALAPPDATA"] = folder
    yield folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(2.0)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"
