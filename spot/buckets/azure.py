"""Azure Blob Storage through the official client (azure-storage-blob, `pip install '.[azure]'`).
Credentials: AZURE_STORAGE_CONNECTION_STRING if set (keys, SAS, Azurite), else the storage
account (`storage.account`) with DefaultAzureCredential (azure-identity: the VM's managed
identity, a workload identity, az login).

Identity: the blob's ETag. Create-if-absent: `If-None-Match: *`; a ranged read is conditional on
the ETag (`If-Match`). A large file goes up as blocks (Put Block), which one Put Block List
commits: the blob appears only then, with every block; uncommitted blocks of an aborted upload
are discarded by the service. Every request's body carries an MD5 the service checks
(validate_content). Retries are the storage client's (exponential from 2 s,
`storage.max_attempts`).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobServiceClient, ExponentialRetry

from spot.buckets import (
    AccessError,
    Bucket,
    BucketError,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
)

CONNECTION_ENV = "AZURE_STORAGE_CONNECTION_STRING"
logging.getLogger("azure").setLevel(logging.WARNING)  # every request at INFO otherwise
# Its failure to find credentials, as a page of warnings: check_access says it in one line.
logging.getLogger("azure.identity").setLevel(logging.ERROR)


def _message(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


def _translated(exc: Exception) -> BucketError:
    if isinstance(exc, ResourceNotFoundError):
        return NotFound(_message(exc))
    # A 409 is a refused create-if-absent only when it says so (BlobAlreadyExists); the others
    # (a lease, snapshots) are failures like any other.
    refused = getattr(exc, "error_code", None) in ("BlobAlreadyExists", "ConditionNotMet")
    if (
        isinstance(exc, ResourceModifiedError)
        or refused
        or (isinstance(exc, HttpResponseError) and exc.status_code == 412)
    ):
        return PreconditionFailed(_message(exc))
    return BucketError(_message(exc))


def _call(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except AzureError as exc:  # after azure-core's retries
        raise _translated(exc) from None


class AzureContainer(Bucket):
    scheme = "az"
    max_parts = 50_000  # blocks per blob

    def __init__(
        self,
        name: str,
        *,
        account: str | None = None,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        concurrency: int = 10,
    ):
        super().__init__(name, concurrency=concurrency)
        # The storage client's default waits 15 s before its first retry (then 18, 24, ...):
        # 2, 4, 8, ... here, as botocore's and GCS's do, so an outage is seen in seconds.
        retry = ExponentialRetry(initial_backoff=2, increment_base=2, retry_total=max_attempts)
        options = {"retry_policy": retry, "connection_timeout": 5, "read_timeout": 60}
        connection = os.environ.get(CONNECTION_ENV)
        self._credential = None
        where = f"storage.bucket={name}"
        if connection and account and f"accountname={account}".lower() not in connection.lower():
            raise AccessError(  # a leftover connection string would send them elsewhere
                f"{where}: storage.account={account} but {CONNECTION_ENV} names another "
                "account; unset one of them"
            )
        if not connection and not (account and re.fullmatch(r"[a-z0-9]{3,24}", account)):
            raise AccessError(
                f"{where}: Azure needs the storage account (storage.account, --account: 3-24 "
                f"lowercase letters and digits) or {CONNECTION_ENV}"
            )
        try:
            if connection:
                service = BlobServiceClient.from_connection_string(connection, **options)
            else:
                from azure.identity import DefaultAzureCredential  # the managed identity, if any

                url = endpoint_url or f"https://{account}.blob.core.windows.net"
                self._credential = DefaultAzureCredential()
                service = BlobServiceClient(url, credential=self._credential, **options)
        except (ValueError, AzureError):  # a malformed connection string, http with a token
            raise AccessError(f"{where}: {CONNECTION_ENV} or the endpoint is unusable") from None
        self.service = service
        self.container = service.get_container_client(name)

    def check_access(self) -> None:
        where = f"storage.bucket={self.name}"
        if self._credential is not None:  # once, before the storage client retries its failure
            try:
                self._credential.get_token("https://storage.azure.com/.default")
            except ClientAuthenticationError:
                raise AccessError(
                    f"{where}: no Azure credentials ({CONNECTION_ENV}, or storage.account with a "
                    "managed identity, workload identity or az login)"
                ) from None
        try:
            next(iter(self.container.list_blobs(results_per_page=1)), None)
        except ResourceNotFoundError:
            raise AccessError(f"{where}: no such container") from None
        except ClientAuthenticationError as exc:
            raise AccessError(
                f"{where}: access denied (credentials refused or no permission: "
                f"{_message(exc)[:120]})"
            ) from None
        except HttpResponseError as exc:
            raise AccessError(f"{where}: unusable ({_message(exc)[:160]})") from None
        except AzureError as exc:  # no credential found, no route to the service
            raise AccessError(
                f"{where}: cannot reach Azure Blob Storage or no credentials "
                f"({CONNECTION_ENV}, or storage.account with a managed identity): "
                f"{_message(exc)[:160]}"
            ) from None

    def put(self, key, data, metadata=None, if_absent=False) -> str:
        got = _call(
            self.container.get_blob_client(key).upload_blob,
            data,
            overwrite=not if_absent,  # False: If-None-Match: *
            metadata=metadata,
            validate_content=True,
        )
        return got["etag"].strip('"')

    def get(self, key):
        stream = _call(self.container.download_blob, key, validate_content=True)
        return _call(stream.readall), dict(stream.properties.metadata or {})

    def get_range(self, key, start, end, identity=None) -> bytes:
        match = {"etag": f'"{identity}"', "match_condition": MatchConditions.IfNotModified}
        stream = _call(
            self.container.download_blob,
            key,
            offset=start,
            length=end - start,
            **(match if identity else {}),
        )
        return _call(stream.readall)

    def head(self, key) -> ObjectInfo:
        props = _call(self.container.get_blob_client(key).get_blob_properties)
        return _info(props)

    def list(self, prefix) -> Iterator[ObjectInfo]:
        try:
            for props in self.container.list_blobs(name_starts_with=prefix):
                yield _info(props)
        except AzureError as exc:
            raise _translated(exc) from None

    def delete(self, keys) -> None:
        for key in keys:
            try:
                _call(self.container.delete_blob, key)
            except NotFound:
                continue

    def download(self, key, path: Path) -> None:
        stream = _call(self.container.download_blob, key, max_concurrency=self.concurrency)
        with open(path, "wb") as f:
            _call(stream.readinto, f)

    def begin(self, key):
        return key, uuid.uuid4().hex

    def put_part(self, upload, number, data):
        key, upload_id = upload
        # Every block ID of a blob has the same length; this upload's own, so another writer's
        # uncommitted blocks never mix in.
        block_id = base64.b64encode(f"{upload_id}-{number:06d}".encode()).decode()
        blob = self.container.get_blob_client(key)
        _call(blob.stage_block, block_id, data, validate_content=True)
        return block_id

    def complete(self, upload, parts) -> str:
        key, _ = upload
        got = _call(self.container.get_blob_client(key).commit_block_list, list(parts))
        return got["etag"].strip('"')

    def abort(self, upload) -> None:
        """Nothing to do: blocks never committed are discarded by the service."""


def _info(props) -> ObjectInfo:
    return ObjectInfo(
        props.name,
        int(props.size or 0),
        str(props.etag or "").strip('"'),
        props.last_modified.timestamp() if props.last_modified else None,
        dict(props.metadata or {}),
    )
