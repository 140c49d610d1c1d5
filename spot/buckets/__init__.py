"""Object stores, each behind the few primitives the checkpoint layer needs (`Bucket`): S3 (and
S3-compatible services), Google Cloud Storage, Azure Blob Storage.

What is written once, above them (spot.checkpoint.storage, .upload, .parts): the verified upload,
the manifest last and created only if absent, receipts, retention, listing and download. What a
back end supplies: a put that returns the object's identity (S3's and Azure's ETag, GCS's
generation: a new one for every write, so a receipt over them shows a file written again), the
same put created only if absent (S3 and Azure `If-None-Match: *`, GCS `ifGenerationMatch=0`), a
multipart upload whose object appears only when completed, a ranged get refused when the object
is no longer the one named, list, delete, download. Each raises the errors below, after its own
client's retries.

URLs: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix (the storage account comes
from `storage.account`, `--account` or the connection string).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SCHEMES = {"s3": "s3", "gs": "gcs", "az": "azure"}  # URL scheme -> storage.backend
MiB = 2**20


class BucketError(Exception):
    """The store failed a request (after its client's retries); str() is one line."""


class NotFound(BucketError):
    """No such object."""


class PreconditionFailed(BucketError):
    """A conditional request refused: the object exists (create-if-absent) or is no longer the
    one named (a ranged get conditional on its identity)."""


class Unsupported(BucketError):
    """The service does not implement conditional writes (some S3-compatible ones)."""


class AccessError(BucketError):
    """The bucket cannot be used at all: missing, refused, unreachable, no credentials."""


@dataclass
class ObjectInfo:
    key: str
    size: int
    identity: str  # S3/Azure: the ETag without quotes; GCS: the generation
    modified: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # only from head()/get()


class Bucket:
    """One bucket (an S3 or GCS bucket, an Azure container). Thread-safe: uploads and ranged
    reads run on many threads at once."""

    scheme = ""
    max_parts = 10_000

    def __init__(self, name: str, *, concurrency: int = 10, part_size: int = 8 * MiB):
        self.name, self.concurrency, self.part_size = name, concurrency, part_size

    def url(self, prefix: str) -> str:
        return f"{self.scheme}://{self.name}/{prefix}".rstrip("/")

    def check_access(self) -> None:
        """AccessError (one line naming the bucket and why) if it cannot be used."""
        raise NotImplementedError

    def put(
        self, key: str, data: bytes, metadata: dict[str, str] | None = None, if_absent: bool = False
    ) -> str:
        """Write one object; its identity. `if_absent`: PreconditionFailed if it exists."""
        raise NotImplementedError

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        """An object's bytes and metadata; NotFound."""
        raise NotImplementedError

    def get_range(self, key: str, start: int, end: int, identity: str | None = None) -> bytes:
        """Bytes [start, end); PreconditionFailed if `identity` is given and the object is no
        longer that one."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        """Delete these objects; one already gone is no error."""
        raise NotImplementedError

    def download(self, key: str, path: Path) -> None:
        """The object into the file `path` (the client's fastest transfer)."""
        raise NotImplementedError

    # A multipart upload: the object appears only when completed, with every part.
    def begin(self, key: str) -> object:
        raise NotImplementedError

    def put_part(self, upload: object, number: int, data: bytes) -> object:
        """Part `number` (from 1); what complete() needs back for it."""
        raise NotImplementedError

    def complete(self, upload: object, parts: list) -> str:
        """Make the object of the parts, in order; its identity."""
        raise NotImplementedError

    def abort(self, upload: object) -> None:
        raise NotImplementedError


def parse_url(url: str) -> tuple[str, str, str]:
    """(backend, bucket, prefix) of s3://, gs:// or az:// URLs; ValueError (one line) else."""
    match = re.match(r"^([a-z0-9]+)://([^/]+)/?(.*)$", url)
    if not match or match.group(1) not in SCHEMES:
        raise ValueError(
            f"{url!r} is not a bucket URL (s3://bucket/prefix, gs://bucket/prefix, "
            "az://container/prefix)"
        )
    return SCHEMES[match.group(1)], match.group(2), match.group(3).strip("/")


def is_url(spec: str) -> bool:
    return any(spec.startswith(f"{scheme}://") for scheme in SCHEMES)


def remote_options(storage, url: str | None = None) -> dict:
    """open_bucket's options from the storage config (a URL names the backend and bucket). For
    a `url` of another bucket back end than the run's (an init.checkpoint in GCS, a run on
    S3): its own client's defaults, not the run's endpoint or account. A run on local disk
    gives its storage keys to any URL (storage.endpoint_url for an init.checkpoint's MinIO)."""
    run = str(storage.backend)
    if url is not None and is_url(url) and run != "local" and parse_url(url)[0] != run:
        return {"max_attempts": storage.max_attempts}
    return {
        "endpoint_url": storage.endpoint_url,
        "region": storage.region,
        "account": storage.account,
        "max_attempts": storage.max_attempts,
    }


def add_remote_arguments(parser) -> None:
    """A command's options for a bucket URL (what the storage config gives train.py)."""
    parser.add_argument(
        "--endpoint-url", default=None, help="the service's endpoint (S3-compatible, emulators)"
    )
    parser.add_argument("--region", default=None, help="s3:// only")
    parser.add_argument(
        "--account",
        default=None,
        help="az:// only: the storage account (else AZURE_STORAGE_CONNECTION_STRING's)",
    )


def remote_arguments(args) -> dict:
    return {"endpoint_url": args.endpoint_url, "region": args.region, "account": args.account}


def open_bucket(
    backend: str,
    name: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    account: str | None = None,
    max_attempts: int = 5,
    concurrency: int = 10,
) -> Bucket:
    """The bucket `name` of `backend` (s3, gcs, azure). Credentials from each client's own chain:
    boto3's (environment, profile, instance role), Application Default Credentials (the VM's
    service account), Azure's connection string or DefaultAzureCredential (managed identity)."""
    options = {"endpoint_url": endpoint_url, "max_attempts": max_attempts}
    extra = {"gcs": "google-cloud-storage", "azure": "azure-storage-blob and azure-identity"}
    try:
        if backend == "s3":
            from spot.buckets.s3 import S3Bucket

            return S3Bucket(name, region=region, concurrency=concurrency, **options)
        if backend == "gcs":
            from spot.buckets.gcs import GCSBucket

            return GCSBucket(name, concurrency=concurrency, **options)
        if backend == "azure":
            from spot.buckets.azure import AzureContainer

            return AzureContainer(name, account=account, concurrency=concurrency, **options)
    except ImportError as exc:
        raise AccessError(
            f"storage={backend} needs {extra.get(backend, backend)}: "
            f"pip install -e '.[{backend}]' ({exc})"
        ) from None
    except ValueError as exc:  # the client refused the endpoint (boto3: "Invalid endpoint")
        raise AccessError(f"storage.bucket={name}: {' '.join(str(exc).split())[:200]}") from None
    raise ValueError(f"storage.backend={backend!r}: not a bucket (s3, gcs, azure)")
