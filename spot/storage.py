"""Remote checkpoints on S3 and S3-compatible services (MinIO, R2, GCS interoperability, Ceph).

Layout: s3://<bucket>/<prefix>/<run.name>/<run.id>/step-<9 digits>/<file>, the same files as on
disk. Upload order makes the remote copy atomic too: the components first, `manifest.json` last,
so a reader never sees a manifest whose files are missing; deletion removes the manifest first.
Credentials come from boto3's chain (environment, profile, instance role) and are never logged.
Retries are botocore's ("adaptive" mode: exponential backoff plus client-side rate limiting on
throttling); multipart transfers are boto3's transfer manager.

A process that is the same run as another (a zombie from before a restart) is fenced: each
process claims the run by writing `owner.json` when it starts, and checks that it still owns it
before every manifest it writes and every deletion. The newest process wins; a zombie stops
uploading. What is left of the race can only produce a checkpoint that fails verification
(files from one writer, manifest from the other), which resume skips: never a wrong one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from spot import manifest
from spot.checkpoint import committed_checkpoints
from spot.events import EventLog
from spot.failpoints import failpoint
from spot.fsutil import fsync_dir, remove_tree
from spot.manifest import MANIFEST, STEP_DIR, CorruptCheckpoint, step_dir_name

log = logging.getLogger(__name__)
for _noisy in ("boto3", "botocore", "s3transfer", "urllib3"):  # their INFO lines are not ours
    logging.getLogger(_noisy).setLevel(logging.WARNING)
MiB = 2**20
OWNER = "owner.json"


class RemoteError(Exception):
    """The bucket cannot be used; str() is one line naming the bucket and the reason."""


@dataclass
class RemoteCheckpoint:
    step: int
    committed: bool  # a manifest exists
    bytes: int
    modified: float | None


def parse_s3_url(url: str) -> tuple[str, str]:
    match = re.match(r"^s3://([^/]+)/?(.*)$", url)
    if not match:
        raise RemoteError(f"{url!r} is not an s3://bucket/prefix URL")
    return match.group(1), match.group(2).strip("/")


class S3Store:
    """One run's checkpoints under s3://bucket/<run_prefix>/."""

    def __init__(
        self,
        bucket: str,
        run_prefix: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        concurrency: int = 10,
    ):
        self.bucket = bucket
        self.prefix = run_prefix.strip("/")
        self.writer = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = Config(
            retries={"mode": "adaptive", "max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=concurrency * 2,
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self.transfer = TransferConfig(
            multipart_threshold=8 * MiB,
            multipart_chunksize=8 * MiB,
            max_concurrency=concurrency,
            use_threads=True,
        )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    # ---- access ---------------------------------------------------------------------------

    def check_access(self) -> None:
        """Raise RemoteError (one line, naming the bucket) if the bucket cannot be used."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise RemoteError(
                f"storage.bucket={self.bucket}: no AWS credentials found "
                "(environment, profile or instance role)"
            ) from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            reason = {
                "404": "does not exist",
                "NoSuchBucket": "does not exist",
                "403": "access denied (credentials refused or no permission)",
            }
            raise RemoteError(
                f"storage.bucket={self.bucket}: {reason.get(code, f'unusable ({code})')}"
            ) from None
        except BotoCoreError as exc:
            raise RemoteError(f"storage.bucket={self.bucket}: cannot reach S3 ({exc})") from None

    def claim(self) -> None:
        """This process now owns the run: a zombie of an earlier process stops writing."""
        body = json.dumps({"writer": self.writer, "since": time.time()}).encode()
        self.client.put_object(Bucket=self.bucket, Key=self.key(OWNER), Body=body)

    def owns(self) -> bool:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(OWNER))["Body"].read()
            return json.loads(body).get("writer") == self.writer
        except (ClientError, ValueError):
            return False

    # ---- listing --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[RemoteCheckpoint]:
        """Every step-* directory under the run, newest first, committed or not."""
        found: dict[int, RemoteCheckpoint] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key("step-")):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(self.key()) + 1 :].split("/")
                match = STEP_DIR.match(rest[0]) if len(rest) == 2 else None
                if not match:
                    continue
                step = int(match.group(1))
                entry = found.setdefault(step, RemoteCheckpoint(step, False, 0, None))
                entry.bytes += obj["Size"]
                entry.modified = max(entry.modified or 0, obj["LastModified"].timestamp())
                entry.committed |= rest[1] == MANIFEST
        return sorted(found.values(), key=lambda c: c.step, reverse=True)

    def committed_steps(self) -> list[int]:
        return [c.step for c in self.list_checkpoints() if c.committed]

    # ---- transfer -------------------------------------------------------------------------

    def upload(self, local_dir: Path, step: int) -> int:
        """Upload a committed local checkpoint: files, then the manifest. Returns bytes sent."""
        m = manifest.read(local_dir)
        # Every file at once through one transfer manager (parts of all files share its
        # concurrency), each part with a CRC32 that S3 verifies on receipt.
        with create_transfer_manager(self.client, self.transfer) as transfers:
            futures = [
                transfers.upload(
                    str(local_dir / file),
                    self.bucket,
                    self.key(step_dir_name(step), file),
                    extra_args={"ChecksumAlgorithm": "CRC32"},
                )
                for file in m.files
            ]
            for future in futures:
                future.result()
        failpoint("upload.file_uploaded", step)
        sent = sum(entry["bytes"] for entry in m.files.values())
        if not self.owns():
            raise RemoteError(f"{self.url}: another process now owns this run; not committing")
        self.client.upload_file(
            str(local_dir / MANIFEST),
            self.bucket,
            self.key(step_dir_name(step), MANIFEST),
            ExtraArgs={"ChecksumAlgorithm": "CRC32"},
        )
        return sent + (local_dir / MANIFEST).stat().st_size

    def download(self, step: int, into: Path) -> Path:
        """Fetch a remote checkpoint into `into/.download-step-N-*`, verify it, and rename it to
        `into/step-N`. Only names the manifest lists (checked: no separators) become paths."""
        name = step_dir_name(step)
        staging = into / f".download-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            try:
                raw = self.client.get_object(Bucket=self.bucket, Key=self.key(name, MANIFEST))
                body = raw["Body"].read()
            except ClientError as exc:
                raise CorruptCheckpoint(f"remote manifest unreadable ({exc})") from None
            m = manifest.parse(body, name)
            for file in m.files:  # names were validated by parse(): a plain file name each
                target = staging / file
                if target.resolve().parent != staging.resolve():
                    raise CorruptCheckpoint(f"remote manifest names an unsafe file {file!r}")
                try:
                    self.client.download_file(
                        self.bucket, self.key(name, file), str(target), Config=self.transfer
                    )
                except ClientError as exc:
                    raise CorruptCheckpoint(f"remote {file} unreadable ({exc})") from None
            (staging / MANIFEST).write_bytes(body)
            manifest.verify(staging)
            final = into / name
            if final.exists():
                remove_tree(final)
            os.replace(staging, final)
            fsync_dir(into)
            return final
        finally:
            if staging.exists():
                remove_tree(staging)

    def delete(self, step: int) -> None:
        """Delete a remote checkpoint, manifest first (it stops existing at once)."""
        name = step_dir_name(step)
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name, MANIFEST))
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(name) + "/"):
            keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})


class Uploader:
    """Uploads committed checkpoints in the background, oldest first, without blocking training.

    A failed upload is retried later with backoff; after `alert_after` consecutive failures the
    run says so loudly (an `upload_failing` event and a warning) and keeps the local copies.
    After each success, `keep_last` is applied to the bucket (only older than the new one)."""

    def __init__(
        self,
        store: S3Store,
        local_root: Path,
        events: EventLog,
        keep_last: int,
        alert_after: int = 3,
        on_uploaded: Callable[[int], None] | None = None,
    ):
        self.store = store
        self.local_root = local_root
        self.events = events
        self.keep_last = keep_last
        self.alert_after = alert_after
        self.on_uploaded = on_uploaded
        self.newest_uploaded: int | None = None
        self.failures = 0
        self._pending: list[int] = []
        self._attempts: dict[int, int] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ckpt-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int) -> None:
        with self._cond:
            if step not in self._pending:
                self._pending.append(step)
                self._pending.sort()
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted checkpoint is uploaded; False if `timeout` ran out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                step = self._pending[0]
            if delay:
                time.sleep(delay)
            if self._upload(step):
                delay = 0.0
                with self._cond:
                    self._pending.remove(step)
                    self._cond.notify_all()
            else:
                delay = min(max(2 * delay, 1.0), 60.0)

    def _upload(self, step: int) -> bool:
        attempts = self._attempts[step] = self._attempts.get(step, 0) + 1
        start = time.perf_counter()
        local = self.local_root / step_dir_name(step)
        try:
            sent = self.store.upload(local, step)
        except Exception as exc:  # S3UploadFailedError, network, disk: never fatal here
            self.failures += 1
            self.events.emit("upload_failed", step=step, attempts=attempts, error=str(exc))
            if self.failures == self.alert_after:
                log.warning(
                    "%d checkpoint uploads in a row failed (last: %s); local copies are kept",
                    self.failures,
                    exc,
                )
                self.events.emit(
                    "upload_failing", step=step, failures=self.failures, error=str(exc)
                )
            return False
        seconds = time.perf_counter() - start
        self.failures = 0
        self.newest_uploaded = max(step, self.newest_uploaded or step)
        self.events.emit(
            "upload",
            step=step,
            bytes=sent,
            seconds=round(seconds, 6),
            attempts=attempts,
            url=f"{self.store.url}/{step_dir_name(step)}/",
        )
        failpoint("upload.committed", step)
        self._retain_remote()
        if self.on_uploaded:
            self.on_uploaded(step)
        return True

    def _retain_remote(self) -> None:
        try:
            committed = self.store.committed_steps()
            stale = [s for s in committed[self.keep_last :] if s < (self.newest_uploaded or 0)]
            if stale and self.store.owns():
                for step in stale:
                    self.store.delete(step)
        except Exception as exc:  # retention is retried after the next upload
            log.warning("remote retention failed (will retry after the next upload): %s", exc)


COMPLETE = "COMPLETE"


def connect(storage, run_name: str, run_id: str) -> S3Store | None:
    """The run's remote store, checked usable (RemoteError otherwise); None for local storage.
    `storage` is the validated StorageConfig."""
    if storage.backend != "s3":
        return None
    prefix = "/".join(p for p in (storage.prefix.strip("/"), run_name, run_id) if p)
    store = S3Store(
        storage.bucket,
        prefix,
        endpoint_url=storage.endpoint_url,
        region=storage.region,
        max_attempts=storage.max_attempts,
    )
    store.check_access()
    return store


def remote_complete(store: S3Store) -> bool:
    try:
        store.client.head_object(Bucket=store.bucket, Key=store.key(COMPLETE))
        return True
    except ClientError:
        return False


def mark_remote_complete(store: S3Store, step: int) -> None:
    store.client.put_object(Bucket=store.bucket, Key=store.key(COMPLETE), Body=f"{step}\n".encode())


def attach(checkpoints, store: S3Store, events: EventLog, alert_after: int) -> Uploader:
    """Wire a CheckpointManager to upload every commit, and to keep local checkpoints until
    they are uploaded. Local checkpoints newer than the bucket's newest are queued now."""
    store.claim()
    uploader = Uploader(
        store,
        checkpoints.root,
        events,
        checkpoints.keep_last,
        alert_after,
        lambda _: checkpoints.retain(),
    )
    checkpoints.remote = store
    checkpoints.on_commit = uploader.submit
    checkpoints.newest_uploaded = lambda: uploader.newest_uploaded
    remote = store.committed_steps()
    uploader.newest_uploaded = remote[0] if remote else None
    for step, _path in reversed(committed_checkpoints(checkpoints.root)):
        if not remote or step > remote[0]:
            uploader.submit(step)
    return uploader
