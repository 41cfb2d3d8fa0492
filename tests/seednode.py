"""A node written from the seed design's README alone, to check that meshchat chats with it.

Compact JSON, a dict of seen ids, forward to every peer but the sender with
ttl - 1 while ttl > 0, display when dst is "" or our label. One thread, a
socket with a timeout-free blocking recvfrom, stopped by a datagram to itself.
"""

import json
import queue
import socket
import threading
import time
import uuid


class SeedNode:
    def __init__(self, peers=(), answer_pings=False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.label = "%s:%d" % self.addr
        self.peers = list(peers)
        self.answer_pings = answer_pings  # like seed builds that flood a PONG for each PING they see
        self.seen = {}
        self.shown: "queue.Queue[dict]" = queue.Queue()
        self.received: "queue.Queue[dict]" = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="seed-node")
        self._thread.start()

    def send(self, body, dst="", kind="CHAT", ttl=8):
        msg = {"mid": str(uuid.uuid4()), "ts": time.time(), "ttl": ttl, "kind": kind, "src": self.label,
               "dst": dst, "body": body}
        self.seen[msg["mid"]] = time.time()
        for peer in self.peers:
            self.sock.sendto(json.dumps(msg, separators=(",", ":")).encode(), peer)
        return msg

    def _run(self):
        while True:
            data, addr = self.sock.recvfrom(65535)
            if self._stop:
                return
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            self.received.put(dict(msg))
            if msg["mid"] in self.seen:
                continue
            self.seen[msg["mid"]] = time.time()
            if msg["kind"] == "CHAT" and msg["dst"] in ("", self.label):
                self.shown.put(dict(msg))
            if self.answer_pings and msg["kind"] == "PING" and msg["dst"] in ("", self.label):
                self.send(msg["mid"], dst=msg["src"], kind="PONG")
            msg["ttl"] -= 1
            if msg["ttl"] > 0:
                for peer in self.peers:
                    if peer != addr:
                        self.sock.sendto(json.dumps(msg, separators=(",", ":")).encode(), peer)

    def close(self):
        self._stop = True
        self.sock.sendto(b"stop", self.addr)
        self._thread.join(5)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
