"""Real ``meshchat`` processes, their stdout lines read into a queue by a thread."""

import json
import queue
import subprocess
import sys
import threading
import time
from typing import List, Optional

TIMEOUT_S = 10.0


class Proc:
    def __init__(self, *args: str, stdin=subprocess.PIPE, preexec_fn=None):
        self.args = [sys.executable, "-m", "meshchat", "--no-discover", *_history(args), *args]
        self.popen = subprocess.Popen(self.args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, encoding="utf-8", errors="replace", preexec_fn=preexec_fn)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="test-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def line(self, want=lambda line: True, what: str = "line", timeout: float = TIMEOUT_S) -> str:
        """The next line of output for which ``want`` holds, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout} s from {self.args}") from None
            if line is None:
                raise AssertionError(f"process ended before a {what}: {self.stderr()}")
            if want(line):
                return line

    def event(self, name: str, timeout: float = TIMEOUT_S) -> dict:
        """The next JSON event called ``name``, skipping others."""
        return json.loads(self.line(lambda line: json.loads(line)["event"] == name, f"{name!r} event", timeout))

    def ready(self) -> str:
        return self.event("ready")["node"]

    def send(self, line: str) -> None:
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(timeout)
        return code

    def stderr(self) -> str:
        return self.popen.stderr.read() if self.popen.poll() is not None else ""

    def rest(self) -> List[dict]:
        """Every event left on stdout, once the process has ended."""
        out = []
        while True:
            line = self.lines.get(timeout=TIMEOUT_S)
            if line is None:
                return out
            out.append(json.loads(line))

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(TIMEOUT_S)
        self._reader.join(TIMEOUT_S)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(*args: str, input: Optional[str] = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshchat", "--no-discover", *_history(args), *args], input=input, capture_output=True,
                          text=True, timeout=timeout)


def _history(args) -> list:
    """Tests keep nothing on disk unless they name a data dir: two tests never share one."""
    return [] if "--data-dir" in args or "--no-history" in args else ["--no-history"]
