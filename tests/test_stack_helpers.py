"""Small process and port helpers the CLI, the bench and the tests share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from streammesh.cli.stack import free_ports, process_alive


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports("127.0.0.1", 20)
    assert len(set(ports)) == 20
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_process_alive_tells_running_from_exited_and_zombie() -> None:
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert not process_alive(child.pid)  # a zombie is not alive
    child.wait()
    assert not process_alive(child.pid)
