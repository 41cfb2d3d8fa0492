"""/send, /files, /accept and /cancel through cli.py: three real meshchat processes with --json."""

import hashlib
import random
from pathlib import Path

from procs import Proc

TIMEOUT_S = 30.0


def start(tmp_path: Path, name: str, *args: str) -> Proc:
    return Proc("--port", "0", "--json", "--downloads", str(tmp_path / name), *args)


def test_send_through_the_cli_reaches_both_nodes_down_a_line_and_bad_commands_are_one_line(tmp_path):
    data = random.Random(5).randbytes(200_000)
    (tmp_path / "report.pdf").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with start(tmp_path, "c", "--accept-files", "0") as c:
        c_label = c.ready()
        with start(tmp_path, "b", "--peers", c_label) as b:
            b_label = b.ready()
            with start(tmp_path, "a", "--peers", b_label) as a:
                a.ready()
                a.event("peer_up", TIMEOUT_S)
                c.event("peer_up", TIMEOUT_S)
                a.send(f"/send {tmp_path / 'nope.pdf'}")
                error = a.event("error")["error"]
                assert "nope.pdf" in error and "\n" not in error
                a.send(f"/send {tmp_path / 'report.pdf'}")
                mine = a.event("file_offer", TIMEOUT_S)
                assert mine["sha256"] == sha and mine["size"] == len(data) and mine["name"] == "report.pdf"
                # b fetches by itself (under --accept-files); c asks first (--accept-files 0).
                assert b.event("file_offer", TIMEOUT_S)["fid"] == mine["fid"]
                done = b.event("file_done", TIMEOUT_S)
                assert done["sha256"] == sha and Path(done["path"]) == tmp_path / "b" / "report.pdf"
                assert Path(done["path"]).read_bytes() == data
                assert c.event("file_offer", TIMEOUT_S)["fid"] == mine["fid"]
                c.send("/files")
                [row] = c.event("files")["files"]
                assert row["state"] == "offered" and row["fid"] == mine["fid"]
                c.send("/accept zz")
                assert "no offer" in c.event("error")["error"]
                c.send("/accept " + mine["fid"][:6])
                done = c.event("file_done", TIMEOUT_S)
                assert done["sha256"] == sha and Path(done["path"]).read_bytes() == data
                a.send("/cancel " + mine["fid"][:6])
                assert "no longer served" in a.event("notice")["text"]
