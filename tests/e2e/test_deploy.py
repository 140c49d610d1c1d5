"""The deployment recipes in docker/, checked as far as this machine allows: it has no Docker
engine (a client only), no cluster, no SLURM and no SkyPilot.

Every file parses. The Kubernetes manifests validate against the Kubernetes API's JSON schemas
(the `kubernetes-validate` package, strict: unknown fields refused), the PyTorchJob against the
fields of the training operator's API types kept below. What containers, pods and jobs would
run is run here instead, as local processes on loopback: the image's entrypoint, the Compose
services, the SLURM script with fake `srun` and `scontrol`, and `make new-experiment`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from spot.run.events import read_events
from spot.run.exitcodes import EXIT_BAD_CONFIG, EXIT_CHECKPOINT_UNUSABLE, EXIT_PREEMPTED

from ..helpers import FAST, REPO, run_dir_of, train_env

pytestmark = pytest.mark.slow

DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
SBATCH = DOCKER / "slurm" / "train.sbatch"
SLOW = {"SPOT_FAILPOINTS": "train.step@sleep=0.03"}  # time to act mid-training
INITS = ("tini", "/usr/bin/tini", "docker-init")
# Where the image keeps what this checkout has (see docker/Dockerfile).
IMAGE_PATHS = {"/app": REPO, "/opt/venv": Path(sys.prefix)}
# Kubernetes versions the manifests must be valid for: podFailurePolicy is GA from 1.31.
K8S_VERSIONS = ("1.31.0", None)  # None: the newest the schema package knows


# --- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(arg.lstrip("+").split("=", 1) for arg in argv if "=" in arg)


def assert_valid_config(argv: list[str], capsys) -> None:
    """The overrides compose and validate as train.py would check them before training."""
    from spot.run.preflight import validate_command_line

    try:
        validate_command_line(argv, REPO / "conf")
    except SystemExit:
        pytest.fail(f"{argv}: {capsys.readouterr().err.strip()}")


def conf(group: str, option: str) -> dict:
    """A group option as a job has it: the schema's defaults and what the option changes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def dockerfile() -> dict:
    """What these tests read of the Dockerfile: every stage's base image (`bases`), every
    instruction in order, and the final stage's user, workdir, env, entrypoint and cmd."""
    lines, pending = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    image: dict = {"bases": [], "instructions": []}
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        image["instructions"].append((op, rest))
        if op == "ARG" and not image["bases"]:
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            image["bases"].append(base)
            image.update(user="root", workdir="/", env={}, entrypoint=[], cmd=[])
        elif op == "ENV":
            image["env"].update(item.split("=", 1) for item in shlex.split(rest))
        elif op in ("USER", "WORKDIR"):
            image[op.lower()] = rest.strip()
        elif op in ("ENTRYPOINT", "CMD"):
            image[op.lower()] = json.loads(rest)
    return image


def here(arg: str) -> str:
    """A path inside the image, as it is in this checkout."""
    for inside, local in IMAGE_PATHS.items():
        if arg == inside or arg.startswith(inside + "/"):
            return str(local) + arg[len(inside) :]
    return arg


def run_here(argv: list[str]) -> list[str]:
    """A container's command as this machine runs it: no init (the test sends signals to the
    process group, as `tini -g` does), the venv's python, the image's paths mapped here."""
    if argv[0] in INITS:
        argv = argv[argv.index("--") + 1 :]
    return [sys.executable if a == "python" else here(a) for a in argv]


def image_env(workdir: Path) -> dict[str, str]:
    """train_env() with the image's ENV, its paths mapped here."""
    env = train_env()
    for key, value in dockerfile()["env"].items():
        value = value.replace("${PATH}", env["PATH"]).replace("$PATH", env["PATH"])
        env[key] = ":".join(here(part) for part in value.split(":"))
    env["HOME"] = str(workdir)  # the image user's own, not this machine's
    return env


def container_argv(service: dict) -> list[str]:
    """What a container of this Compose service runs: `entrypoint` replaces the image's
    ENTRYPOINT and drops its CMD; `command` replaces CMD."""
    image = dockerfile()
    entrypoint, cmd = image["entrypoint"], image["cmd"]
    if "entrypoint" in service:
        entrypoint, cmd = service["entrypoint"], []
    return [a.replace("$$", "$") for a in [*entrypoint, *service.get("command", cmd)]]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def trainers(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name.startswith("trainer-")}


def k8s_docs() -> dict[str, dict]:
    """Every manifest by its path under docker/k8s/: one object per file."""
    return {
        p.relative_to(K8S).as_posix(): yaml.safe_load(p.read_text()) for p in K8S.rglob("*.yaml")
    }


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def start(argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


def stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(what: str, predicate, procs, logs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode} before {what}:\n{tails(logs)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tails(logs)}")
        time.sleep(0.05)


def read_events_under(root: Path) -> list[dict]:
    return [e for path in root.glob("*/*/events.jsonl") for e in read_events(path)]


def tails(logs) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in logs if p.exists())


def trained(root: Path, step: int):
    def predicate() -> bool:
        files = list(root.glob("*/*/events.jsonl"))
        return bool(files) and any(
            e["event"] == "train" and e["step"] >= step for e in read_events(files[0])
        )

    return predicate


# --- every file --------------------------------------------------------------------------------


def test_every_yaml_and_json_file_under_docker_parses():
    parsed = []
    for path in sorted(DOCKER.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            # One document each: the repository's YAML hook (.pre-commit-config.yaml) reads one.
            assert yaml.safe_load(path.read_text()), path
            parsed.append(path.relative_to(DOCKER).as_posix())
        elif path.suffix == ".json":
            json.loads(path.read_text())
            parsed.append(path.relative_to(DOCKER).as_posix())
    assert {"compose.yaml", "skypilot.yaml", "k8s/pytorchjob.yaml", "k8s/job.yaml"} <= set(parsed)


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_pinned_multi_stage_non_root_under_an_init():
    image = dockerfile()
    assert len(image["bases"]) >= 2, "a build stage and a runtime stage"
    for base in image["bases"]:
        tag = base.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), base
    ops = image["instructions"]
    install = next(i for i, (op, rest) in enumerate(ops) if op == "RUN" and "pip install" in rest)
    source = next(i for i, (op, rest) in enumerate(ops) if op == "COPY" and "spot" in rest)
    assert install < source, "dependencies are installed before the source is copied"
    assert any(op == "COPY" and "--from=build" in rest for op, rest in ops)
    assert image["user"] not in ("root", "0", "")
    assert image["entrypoint"][0] in INITS
    runtime = ops[max(i for i, (op, _) in enumerate(ops) if op == "FROM") :]
    assert any(op == "RUN" and "install" in rest and " tini" in rest for op, rest in runtime)
    # The entrypoint runs train.py with the container's arguments.
    script = Path(run_here(image["entrypoint"])[0])
    assert script == DOCKER / "entrypoint.sh" and os.access(script, os.X_OK)
    assert 'exec python "$app/train.py" "$@"' in script.read_text()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "checkpoints", "wandb"} <= set(ignored)


def test_the_image_entrypoint_trains_here(tmp_path):
    """ENTRYPOINT + CMD with the image's ENV, from its WORKDIR, plus small overrides: it trains
    to completion, the run in the working directory."""
    image = dockerfile()
    workdir = tmp_path / image["workdir"].strip("/")
    workdir.mkdir(parents=True)
    argv = run_here([*image["entrypoint"], *image["cmd"]]) + [*FAST, "trainer.max_steps=20"]
    result = subprocess.run(
        argv, cwd=workdir, env=image_env(workdir), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = run_dir_of(workdir / "runs")
    assert run_dir.parent.name == "example" and (run_dir / "COMPLETE").exists()


def test_the_entrypoint_reports_75_as_kubeflow_restarts_it(tmp_path):
    """The PyTorchJob's SPOT_EXIT_PREEMPTED_AS: the entrypoint's shell outlives a SIGTERM to the
    whole process group (what `tini -g` forwards) and turns 75 into that code; other codes pass
    through; unset, the entrypoint is train.py itself. A stand-in `python` plays train.py: on
    SIGTERM it exits 75, or it exits at once with FAKE_EXIT."""
    pytorchjob = k8s_docs()["pytorchjob.yaml"]
    env = {e["name"]: e.get("value") for e in pod_spec(pytorchjob)["containers"][0]["env"]}
    mapped = int(env["SPOT_EXIT_PREEMPTED_AS"])
    bin_dir, ready = tmp_path / "bin", tmp_path / "ready"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        '#!/bin/sh\n[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"\n'
        "trap 'exit 75' TERM\n"
        'echo "$$" > "$FAKE_READY"\nwhile :; do sleep 0.05; done\n'
    )
    (bin_dir / "python").chmod(0o755)
    entrypoint = run_here(dockerfile()["entrypoint"])
    base = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_READY": str(ready)}

    def signalled(extra: dict) -> int:
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen(entrypoint, env={**base, **extra}, start_new_session=True)
        try:
            wait_until("the stand-in's start", ready.exists, [proc], [])
            os.killpg(proc.pid, signal.SIGTERM)
            return proc.wait(timeout=10)
        finally:
            stop([proc])

    assert signalled({"SPOT_EXIT_PREEMPTED_AS": str(mapped)}) == mapped
    assert signalled({}) == EXIT_PREEMPTED
    for code in (0, EXIT_BAD_CONFIG):
        extra = {"SPOT_EXIT_PREEMPTED_AS": str(mapped), "FAKE_EXIT": str(code)}
        assert subprocess.run(entrypoint, env={**base, **extra}).returncode == code


# --- Compose ---------------------------------------------------------------------------------


def test_compose_trainers_use_the_elastic_settings_the_elastic_tests_use(capsys, monkeypatch):
    """The rehearsal's trainers are the tested setup: every elastic setting of the three-agent
    test (tests/test_elastic_agents.py), but for the addresses, which are the services'; each
    trainer polls its own metadata service, as each spot instance has its own."""
    from .cluster import elastic_args
    from .test_elastic_agents import ARGS, STEPS

    services = compose()["services"]
    tested = overrides(elastic_args(29400, STEPS) + ARGS)
    commands = {name: container_argv(s) for name, s in trainers(services).items()}
    assert len(commands) >= 3 and len({tuple(c) for c in commands.values()}) == 1
    hostnames = [s["hostname"] for s in trainers(services).values()]
    assert hostnames == list(trainers(services))  # each reachable by its service name
    argv = next(iter(commands.values()))
    ours = overrides(argv)
    for key, value in tested.items():
        if key != "elastic" and not key.startswith("elastic."):
            continue  # the test's workload (steps, ledger, run root), not the deployment
        if key == "elastic.local_addr":
            assert key not in ours  # null: the container's hostname, set per service
        elif key == "elastic.rdzv_endpoint":
            host, port = ours[key].split(":")
            assert host == "rendezvous" and port == value.split(":")[1]
            assert services["rendezvous"]["expose"] == [port]
            assert port in services["rendezvous"]["entrypoint"]
            store = services["rendezvous"]["entrypoint"]  # the default, loopback, is
            assert store[store.index("--host") + 1] == "0.0.0.0"  # out of the trainers' reach
        else:
            assert ours.get(key) == value, key
    assert ours["storage"] == "s3" and ours["storage.endpoint_url"] == "http://s3:5000"
    assert ours["cloud.metadata_url"] == "${oc.env:METADATA_URL}"  # each trainer's own
    for number, (name, service) in enumerate(trainers(services).items(), 1):
        metadata = f"metadata-{number}"
        assert name == f"trainer-{number}" and services[metadata]["expose"] == ["8169"]
        assert service["environment"]["METADATA_URL"] == f"http://{metadata}:8169"
        assert set(service["depends_on"]) == {"rendezvous", metadata, "bucket"}
    monkeypatch.setenv("METADATA_URL", "http://metadata-1:8169")
    assert_valid_config(run_here(argv)[1:], capsys)


@pytest.mark.serial
def test_compose_services_run_here_on_loopback(tmp_path):
    """`docker compose up` without Docker: each service's command, as its container would run
    it, as a local process, the service names and ports mapped to loopback; the s3 service's
    image is moto's server, which runs here in this process. Two of the trainers (this machine
    has 2 cores) train together, checkpoints in the bucket, each polling its own metadata
    service; a notice to trainer-2 through its own (the rehearsal's curl) stops it with 75, and
    trainer-1 trains on alone to completion."""
    import boto3
    import moto
    from moto.server import ThreadedMotoServer

    services = compose()["services"]
    assert services["s3"]["image"].startswith(f"motoserver/moto:{moto.__version__.split('.')[0]}.")
    ports = {name: int(s["expose"][0]) for name, s in services.items() if "expose" in s}
    loopback = {name: free_port() for name in ports}

    def to_loopback(text: str) -> str:
        for name, port in ports.items():
            text = re.sub(
                rf"(?<![\w.-]){re.escape(name)}:{port}\b", f"127.0.0.1:{loopback[name]}", text
            )
        return text

    def local(name: str) -> tuple[list[str], dict]:
        argv = [to_loopback(a) for a in run_here(container_argv(services[name]))]
        if name in ports:  # a server: listen on its loopback port
            argv = [str(loopback[name]) if a == str(ports[name]) else a for a in argv]
            argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
        env = image_env(tmp_path)
        env.update(
            {k: to_loopback(str(v)) for k, v in services[name].get("environment", {}).items()}
        )
        return argv, env

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=loopback["s3"], verbose=False)
    s3.start()
    procs, logs = [], []
    try:
        servers = {"rendezvous": "listening"}
        servers |= {f"metadata-{n}": "emulator at" for n in (1, 2)}
        for name in servers:
            argv, env = local(name)
            logs.append(tmp_path / f"{name}.log")
            procs.append(start(argv, logs[-1], cwd=tmp_path, env=env))
        for name, ready in servers.items():
            log = tmp_path / f"{name}.log"
            wait_until(name, lambda log=log, ready=ready: ready in log.read_text(), procs, logs)
        argv, env = local("bucket")
        made = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr

        nodes = []
        for name in ("trainer-1", "trainer-2"):
            argv, env = local(name)
            argv += [
                "elastic.local_addr=127.0.0.1",  # in Compose, the container's hostname
                f"run.root={tmp_path / 'runs'}",
                "trainer.max_steps=60",
                "checkpoint.every_steps=10",
                "trainer.log_every=1",
            ]
            logs.append(tmp_path / f"{name}.log")
            nodes.append(start(argv, logs[-1], cwd=tmp_path, env={**env, **SLOW}))
        procs += nodes
        runs = tmp_path / "runs"
        wait_until(
            "two trainers training together",
            lambda: any(e["event"] == "train" and e["step"] >= 5 for e in read_events_under(runs)),
            procs,
            logs,
        )
        notice = f"http://127.0.0.1:{loopback['metadata-2']}/_emulator/notice"
        sent = urllib.request.Request(notice, data=b'{"in_seconds": 120}', method="POST")
        urllib.request.urlopen(sent, timeout=10).close()
        assert nodes[1].wait(timeout=180) == EXIT_PREEMPTED, tails(logs)
        assert nodes[0].wait(timeout=180) == 0, tails(logs)
        for n in (1, 2):
            state = f"http://127.0.0.1:{loopback[f'metadata-{n}']}/_emulator/state"
            with urllib.request.urlopen(state, timeout=10) as reply:
                assert json.loads(reply.read())["requests"] > 0  # each trainer watched its own
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{loopback['s3']}",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            region_name="us-east-1",
        )
        bucket = overrides(services["trainer-1"]["command"])["storage.bucket"]
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    finally:
        stop(procs)
        s3.stop()
    assert any(k.endswith("/COMPLETE") for k in keys), keys  # the run is complete in the bucket
    run_dir = run_dir_of(tmp_path / "runs")
    events = read_events(run_dir / "events.jsonl")
    assert (run_dir / "COMPLETE").exists() and events[-1]["event"] == "complete"
    assert max(e["world_size"] for e in events if e["event"] == "start") == 2, tails(logs)
    assert [e for e in events if e["event"] == "upload"]
    changes = [
        (e["previous"], e["world_size"]) for e in events if e["event"] == "world_size_change"
    ]
    # trainer-1 went on from the emergency checkpoint. (With min_nodes=1 and a 1 s last call, a
    # trainer that reaches the rendezvous first on a busy machine starts alone and the other
    # joins: the group forms in two steps, (1, 2) first, as the elastic settings allow.)
    assert changes in ([(2, 1)], [(1, 2), (2, 1)]), tails(logs)


# --- Kubernetes --------------------------------------------------------------------------------

INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
REPLICA_SPEC = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "replicas": INT32,
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object"},  # checked against Kubernetes' PodTemplateSpec below
    },
}
# kubeflow.org/v1 PyTorchJob as the training operator's API types define it (PyTorchJobSpec,
# ElasticPolicy, ReplicaSpec in pkg/apis/kubeflow.org/v1), kept by hand: no CRD schema ships
# in a package here. Unknown fields are refused, as the API server's structural schema would.
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "runPolicy": {"type": "object"},
                "nprocPerNode": {"type": "string"},
                "elasticPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "minReplicas": INT32,
                        "maxReplicas": INT32,
                        "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]},
                        "rdzvPort": INT32,
                        "rdzvHost": {"type": "string"},
                        "rdzvId": {"type": "string"},
                        "rdzvConf": {"type": "array"},
                        "standalone": {"type": "boolean"},
                        "nProcPerNode": INT32,
                        "maxRestarts": INT32,
                        "metrics": {"type": "array"},
                    },
                },
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {"Master": REPLICA_SPEC, "Worker": REPLICA_SPEC},
                },
            },
        },
    },
}


def test_kubernetes_manifests_validate_against_the_api_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    import jsonschema

    versions = [v or kv.latest_version() for v in K8S_VERSIONS]
    docs = k8s_docs()
    for doc in docs.values():
        if doc["kind"] == "PyTorchJob":
            jsonschema.validate(doc, PYTORCHJOB_SCHEMA)
            for replica in doc["spec"]["pytorchReplicaSpecs"].values():
                # A replica's template is a PodTemplateSpec: validated as a PodTemplate's.
                wrapped = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": doc["metadata"]["name"]},
                    "template": replica["template"],
                }
                for version in versions:
                    kv.validate(wrapped, version, strict=True)
        else:
            for version in versions:
                kv.validate(doc, version, strict=True)
    kinds = {doc["kind"] for doc in docs.values()}
    assert {"Deployment", "Service", "ServiceAccount", "Job", "PyTorchJob"} <= kinds
    # The check is not vacuous: a misspelt field fails it.
    typo = copy.deepcopy(docs["job.yaml"])
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, versions[0], strict=True)


def test_kubernetes_exit_codes_grace_period_and_elastic_settings(capsys):
    docs = k8s_docs()
    job, pytorchjob = docs["job.yaml"], docs["pytorchjob.yaml"]
    service = docs["common/rendezvous-service.yaml"]
    deployment = docs["common/rendezvous-deployment.yaml"]
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # The Service reaches the store where `python -m spot rendezvous` listens.
    (port,) = service["spec"]["ports"]
    (store,) = deployment["spec"]["template"]["spec"]["containers"]
    (listens,) = [p for p in store["ports"] if p["name"] == port["targetPort"]]
    command = store["command"]
    assert command[command.index("--port") + 1] == str(listens["containerPort"])
    assert command[command.index("--host") + 1] == "0.0.0.0"  # the default is loopback only
    endpoint = f"{service['metadata']['name']}:{port['port']}"

    # Plain Job: 2 and 3 fail the job, 75 is retried without counting, a crash counts.
    spec = pod_spec(job)
    container = spec["containers"][0]
    assert spec["restartPolicy"] == "Never"
    rules = {r["action"]: r for r in job["spec"]["podFailurePolicy"]["rules"] if "onExitCodes" in r}
    for action in ("FailJob", "Ignore"):
        assert rules[action]["onExitCodes"]["containerName"] == container["name"]
        assert rules[action]["onExitCodes"]["operator"] == "In"
    assert set(rules["FailJob"]["onExitCodes"]["values"]) == {
        EXIT_BAD_CONFIG,
        EXIT_CHECKPOINT_UNUSABLE,
    }
    assert rules["Ignore"]["onExitCodes"]["values"] == [EXIT_PREEMPTED]

    # PyTorchJob: ExitCode restarts 128-255 only, so 75 is reported as one of those.
    replica = pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = pod_spec(pytorchjob)["containers"][0]
    assert replica["restartPolicy"] == "ExitCode" and container["name"] == "pytorch"
    # With a Master the operator sets RANK and WORLD_SIZE: train.py would start no agent.
    assert set(pytorchjob["spec"]["pytorchReplicaSpecs"]) == {"Worker"}
    env = {e["name"]: e for e in container["env"]}
    assert not {"RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & set(env)
    assert 128 <= int(env["SPOT_EXIT_PREEMPTED_AS"]["value"]) <= 255

    policy = pytorchjob["spec"]["elasticPolicy"]
    for doc in (job, pytorchjob):
        spec = pod_spec(doc)
        container = spec["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        # Kubernetes expands $(VAR) only for variables the container defines.
        refs = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
        assert refs <= set(env), refs - set(env)
        argv = [re.sub(r"\$\(\w+\)", "10.0.0.2", a) for a in container["args"]]
        args = overrides(argv)
        assert_valid_config(argv, capsys)
        assert args["elastic.rdzv_endpoint"] == endpoint
        assert args["elastic.rdzv_store_host"] == "external"
        # The agent waits max(shutdown timeout, notice window) for the emergency checkpoint
        # before it kills its workers; the pod must outlive that.
        elastic = conf("elastic", "elastic")
        elastic.update({k[8:]: v for k, v in args.items() if k.startswith("elastic.")})
        notice = conf("cloud", args.get("cloud", "local"))["notice_seconds"]
        wait = max(int(elastic["shutdown_timeout_seconds"]), notice)
        assert spec["terminationGracePeriodSeconds"] > wait
        # No credentials written in a manifest: from a Secret or the service account.
        for variable in env.values():
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", variable["name"]):
                assert "value" not in variable, variable["name"]
        assert container["envFrom"][0]["secretRef"]["optional"] is True
        assert spec["serviceAccountName"] == docs["common/serviceaccount.yaml"]["metadata"]["name"]
    args = overrides(pod_spec(job)["containers"][0]["args"])
    nodes = int(args["elastic.min_nodes"]), int(args["elastic.max_nodes"])
    assert nodes[0] <= job["spec"]["parallelism"] <= nodes[1]

    # The PyTorchJob tells the operator what train.py's agent is told.
    args = overrides(pod_spec(pytorchjob)["containers"][0]["args"])
    assert policy["minReplicas"] == int(args["elastic.min_nodes"])
    assert policy["maxReplicas"] == int(args["elastic.max_nodes"])
    assert policy["minReplicas"] <= replica["replicas"] <= policy["maxReplicas"]
    assert policy["rdzvBackend"] == args["elastic.rdzv_backend"]
    assert f"{policy['rdzvHost']}:{policy['rdzvPort']}" == args["elastic.rdzv_endpoint"]
    assert policy["maxRestarts"] == int(args["elastic.max_restarts"])
    assert pytorchjob["spec"]["nprocPerNode"] == args["elastic.nproc_per_node"]


# --- SkyPilot ------------------------------------------------------------------------------------


def test_skypilot_recovers_on_preemption_and_75_only(capsys):
    task = yaml.safe_load((DOCKER / "skypilot.yaml").read_text())
    resources = task["resources"]
    assert resources["use_spot"] is True
    recovery = resources["job_recovery"]
    assert recovery["recover_on_exit_codes"] == [EXIT_PREEMPTED]
    assert recovery["max_restarts_on_errors"] == 0  # 2, 3, 1, 4: not retried
    # The run section as bash runs it, with `python` replaced by a function printing its args.
    for endpoint in ("", "https://storage.googleapis.com"):
        script = f"conda() {{ :; }}\npython() {{ printf '%s\\n' \"$@\"; }}\n{task['run']}"
        env = {**os.environ, **task["envs"], "S3_ENDPOINT": endpoint}
        env["SKYPILOT_NUM_GPUS_PER_NODE"] = "8"
        ran = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        script_name, *argv = ran.stdout.splitlines()
        assert script_name == "train.py"
        args = overrides(argv)
        assert args["storage"] == "s3" and args["storage.bucket"] == task["envs"]["CKPT_BUCKET"]
        assert args.get("storage.endpoint_url", "") == endpoint
        assert args["elastic.nproc_per_node"] == "8"
        assert_valid_config(argv, capsys)
    assert subprocess.run(["bash", "-n", "-c", task["setup"]]).returncode == 0


# --- SLURM ---------------------------------------------------------------------------------------


def fake_slurm(tmp_path: Path) -> tuple[dict, Path]:
    """`srun` that runs its command in place (options dropped) and `scontrol` that does
    nothing; both write their arguments to a log."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "slurm-calls.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/sh\necho "srun $*" >> "$FAKE_SLURM_LOG"\n'
        'while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol $*" >> "$FAKE_SLURM_LOG"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **train_env(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(calls),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "PYTHON": sys.executable,
    }
    return env, calls


def test_slurm_script_signals_and_requeue_options():
    options = [
        line.split(maxsplit=1)[1]
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert "--requeue" in options
    (signal_option,) = [o for o in options if o.startswith("--signal=")]
    # To the job step (train.py), not B: (the batch shell), with cloud=slurm's window.
    assert signal_option == f"--signal=USR1@{conf('cloud', 'slurm')['notice_seconds']}"
    assert "SIGUSR1" in conf("cloud", "slurm")["signals"]


def test_slurm_script_requeues_after_sigusr1(tmp_path):
    env, calls = fake_slurm(tmp_path)
    root = tmp_path / "runs"
    args = [*FAST, "trainer.max_steps=400", "trainer.log_every=1", f"run.root={root}"]
    log = tmp_path / "job.log"
    proc = start(["bash", str(SBATCH), *args], log, cwd=tmp_path, env={**env, **SLOW})
    try:
        wait_until("step 5", trained(root, 5), [proc], [log])
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (train_py,) = children  # what srun ran: train.py itself
        # --signal=USR1@90 signals the step's tasks, not the batch shell.
        os.kill(int(train_py), signal.SIGUSR1)
        assert proc.wait(timeout=60) == EXIT_PREEMPTED, tails([log])
    finally:
        stop([proc])
    srun, requeue = calls.read_text().splitlines()
    assert srun.startswith("srun --ntasks-per-node=1 ") and " cloud=slurm " in srun
    assert requeue == "scontrol requeue 4242"
    run_dir = run_dir_of(root)
    events = read_events(run_dir / "events.jsonl")
    (notice,) = [e for e in events if e["event"] == "notice"]
    assert notice["kind"] == "SIGUSR1"
    (emergency,) = [e for e in events if e["event"] == "emergency_checkpoint"]
    assert (run_dir / "checkpoints" / f"step-{emergency['step']:09d}").is_dir()


def test_slurm_script_does_not_requeue_a_bad_config(tmp_path):
    env, calls = fake_slurm(tmp_path)
    result = subprocess.run(
        ["bash", str(SBATCH), "checkpoint.keep_last=0", f"run.root={tmp_path}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_BAD_CONFIG, result.stderr
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["srun"]


# --- make new-experiment -------------------------------------------------------------------------


def test_make_new_experiment_writes_a_config_that_trains(tmp_path):
    """In a copy of the checkout (a user's fork), so nothing is written into this one."""
    fork = tmp_path / "fork"
    shutil.copytree(
        REPO,
        fork,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "runs",
            "outputs",
            "multirun",
            "wandb",
            "tests",
            "*.egg-info",
            ".*cache",
        ),
    )

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "new-experiment", *args], cwd=fork, capture_output=True, text=True
        )

    made = make("NAME=my_model")
    assert made.returncode == 0, made.stderr
    path = fork / "conf" / "experiment" / "my_model.yaml"
    assert path.read_text().startswith("# @package _global_\n")
    assert yaml.safe_load(path.read_text())["run"]["name"] == "my_model"
    for args, says in (
        (["NAME=my_model"], "already exists"),
        (["NAME=My-Model"], "lowercase letters, digits and underscores"),
        (["NAME=a b"], "lowercase letters, digits and underscores"),
        ([], "give a name"),
    ):
        refused = make(*args)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    result = subprocess.run(
        [sys.executable, str(fork / "train.py"), "+experiment=my_model", "logger=none"]
        + ["trainer.max_steps=20", f"run.root={tmp_path / 'runs'}"],
        cwd=fork,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = run_dir_of(tmp_path / "runs")
    assert run_dir.parent.name == "my_model" and (run_dir / "COMPLETE").exists()
