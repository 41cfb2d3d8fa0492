"""Free UDP ports on 127.0.0.1, found at run time."""

import socket
from contextlib import ExitStack
from typing import List


def free_port_run(count: int, attempts: int = 50) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            if base + count > 65535:
                continue
            try:
                with ExitStack() as stack:
                    for port in range(base + 1, base + count):
                        s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                        s.bind(("127.0.0.1", port))
                return base
            except OSError:
                continue
    raise RuntimeError(f"no run of {count} free ports")


def free_ports(count: int) -> List[int]:
    base = free_port_run(count)
    return list(range(base, base + count))
