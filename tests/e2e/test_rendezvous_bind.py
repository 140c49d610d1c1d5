"""`python -m spot rendezvous` serves an unauthenticated TCPStore: by default it listens on
loopback only, exactly where it says; another address is a choice, and it warns."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from ..helpers import REPO, train_env
from .cluster import free_port

pytestmark = pytest.mark.slow


def listening(port: int) -> set[str]:
    """The addresses on which some socket of this machine listens on TCP `port` (/proc/net)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if int(hex_port, 16) != port or state != "0A":  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


def this_machines_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one (the kernel's list of local
    addresses: an address line, then `/32 host LOCAL`)."""
    try:
        with open("/proc/net/fib_trie") as f:
            rows = f.read().splitlines()
    except OSError:
        return None
    for above, row in zip(rows, rows[1:], strict=False):
        if row.strip() == "/32 host LOCAL":
            address = above.split()[-1]
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


def serve(*args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spot", "rendezvous", *args, "--port", str(port)],
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, port


def ready(proc: subprocess.Popen) -> list[str]:
    """The lines it printed up to and including its `store listening` line."""
    lines = []
    deadline = time.monotonic() + 60
    while not lines or "store listening" not in lines[-1]:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"exited {proc.poll()}: {lines}"
        lines.append(line.rstrip("\n"))
    return lines


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def test_it_listens_on_loopback_only_unless_told_and_then_warns():
    default, default_port = serve()  # both start at once: each imports torch
    everywhere, everywhere_port = serve("--host", "0.0.0.0")
    try:
        lines = ready(default)
        assert lines[-1].endswith(f"listening on 127.0.0.1:{default_port}"), lines
        assert listening(default_port) == {"127.0.0.1"}
        assert not [line for line in lines if "warning" in line], lines
        client = TCPStore("127.0.0.1", default_port, is_master=False, timeout=timedelta(seconds=10))
        client.set("reached", "over loopback")
        assert client.get("reached") == b"over loopback"
        outside = this_machines_address()
        if outside is not None:  # from this machine's own other address: nobody listens
            with pytest.raises(ConnectionRefusedError), socket.socket() as s:
                s.connect((outside, default_port))

        lines = ready(everywhere)
        assert lines[-1].endswith(f"listening on 0.0.0.0:{everywhere_port}"), lines
        (warning,) = [line for line in lines if "warning" in line]
        assert "no authentication" in warning, lines
        assert listening(everywhere_port) == {"0.0.0.0"}
    finally:
        stop(default)
        stop(everywhere)
