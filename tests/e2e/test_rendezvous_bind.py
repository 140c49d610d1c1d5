"""The stores torch's elastic launch uses have no authentication, and torch's TCPStore server
listens on every interface whatever host it is given. `python -m spot rendezvous` listens on
loopback only by default, exactly where it says; another address is a choice, and it warns.
train.py's own agent and workers listen on loopback only on one node, and on the address the
config names otherwise."""

from __future__ import annotations

import contextlib
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

from ..helpers import FAST, REPO, await_marker, start_armed, train_env
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


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (torch starts workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:  # "pid (comm) state ppid ..."
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def listening_sockets(pids: list[int]) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket these processes hold that listens (their file
    descriptors' socket inodes, found in /proc/net/tcp and tcp6)."""
    inode_pid = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inode_pid[target[8:-1]] = pid
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] != "0A" or fields[9] not in inode_pid:  # 0A: LISTEN
                    continue
                address, hex_port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((inode_pid[fields[9]], socket.inet_ntop(family, raw), int(hex_port, 16)))
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


def test_a_name_is_bound_at_its_address_and_a_name_this_machine_maps_to_loopback_nowhere():
    from spot.distributed.rendezvous import listen_address

    assert listen_address("127.0.0.1") == "127.0.0.1"
    assert listen_address("[::1]") == "::1"
    assert listen_address("localhost") == "127.0.0.1"
    assert listen_address("no-such-host.invalid") is None
    # (Debian maps the machine's own name to 127.0.1.1: the others reach it elsewhere.)
    if ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback:
        assert listen_address(socket.gethostname()) is None
    outside = this_machines_address()
    if outside is not None:
        assert listen_address(outside) == outside


def listeners_while_training(args: list[str], tmp_path) -> tuple[int, set[tuple[int, str, int]]]:
    """The agent's pid and what its process tree listens on while both ranks are in training
    (rank 0 held at step 3, rank 1 waiting for it in the next collective)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    argv = [*FAST, "trainer.max_steps=20", "elastic.nproc_per_node=2", *args]
    proc, marker = start_armed([*argv, f"run.root={tmp_path}"], "train.step@step=3@rank=0", markers)
    try:
        await_marker(proc, marker)
        tree = process_tree(proc.pid)
        assert len(tree) >= 4, tree  # the agent, the forkserver, two workers
        return proc.pid, listening_sockets(tree)
    finally:
        stop(proc)


@pytest.mark.serial
def test_one_node_listens_on_loopback_only(tmp_path):
    """The agent's rendezvous store, rank 0's process-group store and gloo's sockets: torch's
    defaults put both stores on every interface ([::]), unauthenticated."""
    agent, sockets = listeners_while_training([], tmp_path)
    assert {pid for pid, _, _ in sockets} > {agent}, sockets  # the agent's store, and workers'
    assert {address for _, address, _ in sockets} == {"127.0.0.1"}, sockets


@pytest.mark.serial
def test_the_agent_hosted_store_listens_on_the_endpoints_address(tmp_path):
    """Several nodes allowed: the store the agent hosts listens where `rdzv_endpoint` names, as
    the other nodes reach it, and only there; this attempt's workers, all on this node, on
    loopback."""
    outside = this_machines_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    port = free_port()
    args = [
        "elastic=elastic",
        "elastic.min_nodes=1",
        "elastic.max_nodes=2",
        f"elastic.rdzv_endpoint={outside}:{port}",
        "elastic.rdzv_last_call_seconds=1",
    ]
    agent, sockets = listeners_while_training(args, tmp_path)
    assert (agent, outside, port) in sockets, sockets
    assert {address for _, address, _ in sockets} == {outside, "127.0.0.1"}, sockets
    assert {address for pid, address, _ in sockets if pid != agent} == {"127.0.0.1"}, sockets


def test_the_kubernetes_recipe_lets_only_trainers_reach_the_store_and_each_other():
    """Across nodes the stores, gloo and NCCL must listen where other nodes reach them, with no
    authentication: the recipe's NetworkPolicies admit the trainer pods of both recipes alone,
    to the store's port and to each other (tests/e2e/test_deploy.py validates their schema)."""
    import yaml

    k8s = REPO / "docker" / "k8s"
    docs = {
        p.relative_to(k8s).as_posix(): yaml.safe_load(p.read_text()) for p in k8s.rglob("*.yaml")
    }
    store = docs["common/rendezvous-deployment.yaml"]["spec"]["template"]
    (store_port,) = store["spec"]["containers"][0]["ports"]
    trainers = [
        docs["job.yaml"]["spec"]["template"]["metadata"]["labels"],
        docs["pytorchjob.yaml"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"][
            "labels"
        ],
    ]
    policies = [doc["spec"] for doc in docs.values() if doc["kind"] == "NetworkPolicy"]

    def selects(selector: dict, labels: dict) -> bool:
        return (
            set(selector) == {"matchLabels"} and selector["matchLabels"].items() <= labels.items()
        )

    def only_trainers(rule: dict) -> bool:
        return all(set(peer) == {"podSelector"} for peer in rule["from"]) and all(
            any(selects(peer["podSelector"], labels) for peer in rule["from"])
            for labels in trainers
        )

    for pod, ports in [(store["metadata"]["labels"], [store_port["containerPort"]])] + [
        (labels, None) for labels in trainers
    ]:
        (policy,) = [p for p in policies if selects(p["podSelector"], pod)]
        assert policy["policyTypes"] == ["Ingress"]
        (rule,) = policy["ingress"]
        assert only_trainers(rule), rule
        assert not any(
            selects(peer["podSelector"], store["metadata"]["labels"]) for peer in rule["from"]
        )
        assert [p["port"] for p in rule.get("ports", [])] == (ports or []), rule
