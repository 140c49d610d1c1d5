"""Google Cloud Storage through the official client (google-cloud-storage, `pip install
'.[gcs]'`). Credentials: Application Default Credentials (a GCP VM's service account,
GOOGLE_APPLICATION_CREDENTIALS, gcloud's login); an endpoint (an emulator) is used without any.

Identity: the object's generation, new for every write. Create-if-absent: `ifGenerationMatch=0`;
a ranged read is conditional on the generation. A large file goes up as parts, each its own
temporary object beside the file (`<file>.parts-<id>/<n>`), which one compose (a tree of them
past 32 parts) makes the object, then deleted: GCS's parallel composite upload, the object
appearing only when composed. Every request carries a CRC32C GCS checks. Retries are the
client's, for every request here: the puts too (idempotent here: the same bytes again, whose
new generation is the one reported).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import requests
from google.api_core import exceptions as api
from google.api_core.retry import Retry
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from spot.buckets import (
    AccessError,
    Bucket,
    BucketError,
    MiB,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
)

COMPOSE_MAX = 32  # sources per compose request
log = logging.getLogger(__name__)


def _translated(exc: Exception) -> BucketError:
    if isinstance(exc, api.NotFound):
        return NotFound(str(exc).splitlines()[0])
    if isinstance(exc, api.PreconditionFailed):
        return PreconditionFailed(str(exc).splitlines()[0])
    return BucketError(" ".join(str(exc).split())[:300] or type(exc).__name__)


_FAILURES = (
    api.GoogleAPIError,
    GoogleAuthError,
    requests.RequestException,
    DataCorruption,  # a download whose CRC32C does not match
    InvalidResponse,
    ValueError,
)


def _call(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _FAILURES as exc:  # after the client's retries
        raise _translated(exc) from None


class GCSBucket(Bucket):
    scheme = "gs"

    def __init__(
        self,
        name: str,
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        concurrency: int = 10,
    ):
        # Parts of 32 MiB (gsutil composes 50 MiB ones): the client sends an object up to 8 MiB
        # as one multipart/related request and a larger one as a resumable upload, which the
        # emulator takes 10x faster; and fewer parts, fewer composes.
        super().__init__(name, concurrency=concurrency, part_size=32 * MiB)
        # The client's retry (1 s, doubling), with a deadline in place of an attempt count.
        self.retry: Retry = DEFAULT_RETRY.with_timeout(10.0 * max_attempts)
        self._endpoint = endpoint_url
        self._client: storage.Client | None = None

    @property
    def client(self) -> storage.Client:
        if self._client is None:  # credentials are looked up once, here (check_access says why)
            if self._endpoint and self._endpoint.startswith("http://"):
                # An emulator: plain HTTP, no credentials (GCS itself is only served on https).
                from google.auth.credentials import AnonymousCredentials

                self._client = storage.Client(
                    project="spot",
                    credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": self._endpoint},
                )
            else:  # GCS, or another https endpoint of it (regional, Private Service Connect)
                options = {"api_endpoint": self._endpoint} if self._endpoint else None
                self._client = storage.Client(project=None, client_options=options)
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.concurrency * 2)
            self._client._http.mount("https://", adapter)
            self._client._http.mount("http://", adapter)
        return self._client

    @property
    def _bucket(self):
        return self.client.bucket(self.name)

    def check_access(self) -> None:
        where = f"storage.bucket={self.name}"
        try:
            next(iter(self.client.list_blobs(self.name, max_results=1, retry=self.retry)), None)
        except GoogleAuthError as exc:
            raise AccessError(
                f"{where}: no Google credentials (Application Default Credentials: the VM's "
                f"service account, GOOGLE_APPLICATION_CREDENTIALS or gcloud auth): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        except api.NotFound:
            raise AccessError(f"{where}: does not exist") from None
        except (api.Forbidden, api.Unauthorized):
            raise AccessError(
                f"{where}: access denied (credentials refused or no permission)"
            ) from None
        except (api.GoogleAPIError, requests.RequestException) as exc:
            raise AccessError(f"{where}: cannot reach GCS ({_translated(exc)})") from None

    def put(self, key, data, metadata=None, if_absent=False) -> str:
        blob = self._bucket.blob(key)
        if metadata:
            blob.metadata = metadata
        _call(
            blob.upload_from_string,
            data,
            content_type="application/octet-stream",
            if_generation_match=0 if if_absent else None,
            checksum="crc32c",
            retry=self.retry,
        )
        return str(blob.generation)

    def _blob(self, key):
        blob = _call(self._bucket.get_blob, key, retry=self.retry)
        if blob is None:
            raise NotFound(f"gs://{self.name}/{key}: no such object")
        return blob

    def get(self, key):
        blob = self._blob(key)
        data = _call(blob.download_as_bytes, if_generation_match=blob.generation, retry=self.retry)
        return data, dict(blob.metadata or {})

    def get_range(self, key, start, end, identity=None) -> bytes:
        blob = self._bucket.blob(key)
        return _call(
            blob.download_as_bytes,
            start=start,
            end=end - 1,
            if_generation_match=int(identity) if identity else None,
            checksum=None,  # a range has no checksum of its own; the caller checks the bytes
            retry=self.retry,
        )

    def head(self, key) -> ObjectInfo:
        return _info(self._blob(key))

    def list(self, prefix) -> Iterator[ObjectInfo]:
        try:
            for blob in self.client.list_blobs(self.name, prefix=prefix, retry=self.retry):
                yield _info(blob)
        except _FAILURES as exc:
            raise _translated(exc) from None

    def delete(self, keys) -> None:
        for key in keys:
            with contextlib.suppress(NotFound):
                _call(self._bucket.delete_blob, key, retry=self.retry)

    def download(self, key, path: Path) -> None:
        blob = self._bucket.blob(key)
        _call(blob.download_to_filename, str(path), checksum="crc32c", retry=self.retry)

    def begin(self, key):
        return key, f"{key}.parts-{uuid.uuid4().hex[:12]}"

    def put_part(self, upload, number, data):
        _, parts = upload
        part = f"{parts}/{number:05d}"
        return part, self.put(part, data)  # the compose takes this generation of it, no other

    def complete(self, upload, parts) -> str:
        key, prefix = upload
        sources, level = list(parts), 0
        while len(sources) > COMPOSE_MAX:  # a tree of composes, 32 sources each
            level += 1
            sources = [
                self._compose(f"{prefix}/level-{level}-{i:05d}", sources[i : i + COMPOSE_MAX])
                for i in range(0, len(sources), COMPOSE_MAX)
            ]
        identity = self._compose(key, sources, generation=True)
        try:
            self.abort(upload)  # the parts and the levels between
        except BucketError as exc:  # the object is made; retention removes them with the step
            log.warning("could not delete the parts of %s: %s", key, exc)
        return identity

    def _compose(self, key: str, sources: list, generation: bool = False):
        """Compose `sources` ((name, generation) each) into `key`: its generation, or for a
        level between, (key, generation)."""
        target = self._bucket.blob(key)
        _call(
            target.compose,
            [self._bucket.blob(name) for name, _ in sources],
            if_source_generation_match=[int(made) for _, made in sources],
            retry=self.retry,
        )
        return str(target.generation) if generation else (key, str(target.generation))

    def abort(self, upload) -> None:
        _, prefix = upload
        self.delete([info.key for info in self.list(prefix + "/")])


def _info(blob) -> ObjectInfo:
    return ObjectInfo(
        blob.name,
        int(blob.size or 0),
        str(blob.generation),
        blob.updated.timestamp() if blob.updated else None,
        dict(blob.metadata or {}),
    )
