"""Real protocol servers for the GCS and Azure back ends, started by the tests on loopback: the
PyPI package gcp-storage-emulator (GCS's JSON API) and Azurite (Microsoft's Blob Storage
emulator, from npm: `make install-test` puts it in .venv/azurite).

What gcp-storage-emulator does not serve: preconditions (it ignores ifGenerationMatch). The tests
that need them put `PreconditionProxy` in front of it, which enforces them as GCS documents
(412 when the object's generation differs, 0: when it exists)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from tests.helpers import REPO, free_port

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (the same in every installation; not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_binary() -> str | None:
    here = REPO / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    return str(here) if here.exists() else shutil.which("azurite-blob")


def _serve(command: list[str], port: int, log: Path) -> subprocess.Popen | None:
    """Start `command` listening on `port`; None if it exited (the port was taken meanwhile).
    It runs in the log's directory (what it writes, it writes there)."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{command[0]} did not listen on {port} in 60 s: {log.read_text()[-2000:]}")


@contextmanager
def server(make_command, log: Path):
    """A server on a free loopback port (another port if the first was taken before it bound):
    yields the port."""
    for _ in range(5):
        port = free_port()
        process = _serve(make_command(port), port, log)
        if process is not None:
            break
    else:
        raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def gcs_emulator(log: Path):
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "-q", "-M", "-H", "127.0.0.1"]
    with server(lambda port: [*command, "--port", str(port)], log) as port:
        yield f"http://127.0.0.1:{port}"


@contextmanager
def azurite(log: Path):
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError("Azurite is not installed: make install-test (npm install azurite)")

    def command(port: int) -> list[str]:
        return [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
        ]

    with server(command, log) as port:
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"


def azurite_connection(endpoint: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint};"
    )


def gcs_client(endpoint: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="spot",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )


def azure_service(endpoint: str):
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(azurite_connection(endpoint))


def gcs_precondition(endpoint: str):
    """A FaultProxy rule that enforces GCS's ifGenerationMatch on uploads and reads in front of
    gcp-storage-emulator (which ignores it): 412 as GCS answers, else the request passes."""
    client = gcs_client(endpoint)

    def rule(method: str, path: str, body: bytes):
        url = urlparse(path)
        query = parse_qs(url.query)
        if "ifGenerationMatch" not in query:
            return "pass"
        wanted = int(query["ifGenerationMatch"][0])
        if method == "POST" and "/upload/" in url.path:  # the name: in the query or the metadata
            bucket = url.path.split("/b/", 1)[1].split("/o", 1)[0]
            named = re.search(rb'"name":\s*"([^"]+)"', body)
            key = query.get("name", [named.group(1).decode() if named else ""])[0]
        else:
            bucket, rest = url.path.split("/b/", 1)[1].split("/o/", 1)
            key = unquote(rest)
        blob = client.bucket(bucket).get_blob(key) if key else None
        generation = int(blob.generation) if blob is not None else 0
        return "pass" if generation == wanted else "412"

    return rule


def create_bucket(backend: str, endpoint: str, name: str) -> None:
    if backend == "s3":
        import boto3

        from tests.helpers import CREDENTIALS

        keys = {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"]}
        keys["aws_secret_access_key"] = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(
            Bucket=name
        )
    elif backend == "gcs":
        gcs_client(endpoint).create_bucket(name)
    else:
        azure_service(endpoint).create_container(name)


def no_cloud_credentials(env: dict[str, str]) -> dict[str, str]:
    """`env` with no way to find GCS or Azure credentials: no key files or connection string,
    an empty gcloud configuration, and each cloud's metadata service (where a VM's identity
    comes from) pointed at a closed port on loopback, so the test does not depend on what
    answers at 169.254.169.254 on the machine running it."""
    env = {k: v for k, v in env.items() if not k.startswith(("GOOGLE_", "AZURE_", "CLOUDSDK_"))}
    empty = Path(env.get("TMPDIR", "/tmp")) / "spot-no-credentials"
    empty.mkdir(exist_ok=True)
    closed = f"127.0.0.1:{free_port()}"
    return {
        **env,
        "HOME": str(empty),
        "CLOUDSDK_CONFIG": str(empty),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://{closed}",
    }
