"""Remote checkpoints on S3 and S3-compatible services (MinIO, R2, GCS interoperability, Ceph).

Layout: s3://<bucket>/<prefix>/<run.name>/<run.id>/step-<9 digits>/<file>, the same files as on
disk. Upload order makes the remote copy atomic too: the components first, `manifest.json` last,
so a reader never sees a manifest whose files are missing; deletion removes the manifest first.
Credentials come from boto3's chain (environment, profile, instance role) and are never logged.
Retries are botocore's ("adaptive" mode: exponential backoff plus client-side rate limiting on
throttling). Uploads check every byte they send against the manifest (spot.checkpoint.upload); downloads
are boto3's transfer manager, verified before the checkpoint is renamed into place.

A process that is the same run as another (a zombie from before a restart) is fenced: each
process claims the run by writing `owner.json` when it starts, and checks that it still owns it
before every manifest it writes and every deletion. The newest process wins; a zombie stops
uploading. S3 conditions apply only to the object being written, so that check and the manifest
write cannot be one atomic step; where the service supports conditional writes, the manifest is
created only if absent, so a commit is never overwritten unseen, and the upload receipt (see
`receipt`) shows any file written again after a commit. What is left of the race can only
produce a checkpoint that fails verification (files from one writer, manifest from the other),
which retention does not count and resume skips: never a wrong one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from spot.checkpoint import manifest
from spot.checkpoint.manager import committed_checkpoints
from spot.checkpoint.manifest import MANIFEST, STEP_DIR, CorruptCheckpoint, step_dir_name
from spot.checkpoint.upload import NOT_FOUND, RECEIPT, Uploader, error_code, receipt, send_files
from spot.failpoints import failpoint
from spot.fsutil import fsync_dir, fsync_file, remove_tree
from spot.run.config import one_line
from spot.run.events import EventLog
from spot.run.identity import COMPLETE

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
    objects: dict[str, tuple[int, str]] = field(default_factory=dict)  # file: (size, ETag)


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


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
        self.concurrency = concurrency
        # Conditional writes (If-None-Match) until the service answers that it has none.
        self.conditional = True
        # Steps whose download in this process failed: not counted, whatever a listing says.
        self.unusable: dict[int, str] = {}
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
                entry.objects[rest[1]] = (obj["Size"], obj.get("ETag", ""))
        return sorted(found.values(), key=lambda c: c.step, reverse=True)

    def committed_steps(self) -> list[int]:
        return [c.step for c in self.list_checkpoints() if c.committed]

    # ---- transfer -------------------------------------------------------------------------

    def upload(self, local_dir: Path, step: int) -> int:
        """Upload a committed local checkpoint: files, then the manifest. Returns bytes sent.
        CorruptCheckpoint, committing nothing, if the local copy vanished or its files do not
        match its manifest (spot.checkpoint.upload.send_files checks what it sends); RemoteError if another
        process now owns the run."""
        name = step_dir_name(step)
        try:  # these bytes are what is checked and what is committed, whatever the disk does
            body = (local_dir / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{local_dir} is gone (moved aside or deleted)") from None
        m = manifest.parse(body, name)
        elsewhere = manifest.published(m.files)  # uploaded by the ranks that wrote them
        try:
            etags = send_files(
                self.client,
                self.bucket,
                {file: self.key(name, file) for file in m.files if file not in elsewhere},
                local_dir,
                {file: entry for file, entry in m.files.items() if file not in elsewhere},
                part_size=self.transfer.multipart_chunksize,
                concurrency=self.concurrency,
            )
            etags.update(self.check_published(name, elsewhere))
        except CorruptCheckpoint:
            self._discard_refused(name, step)
            raise
        failpoint("upload.file_uploaded", step)
        if not self.owns():
            raise RemoteError(f"{self.url}: another process now owns this run; not committing")
        self._commit(name, body, receipt(etags))
        self.unusable.pop(step, None)
        return m.total_bytes + len(body)

    def check_published(self, name: str, entries: dict[str, dict]) -> dict[str, str]:
        """The ETags of files their ranks uploaded (spot.checkpoint.parts), once each is found
        in the bucket as that object (its ETag) with its size. CorruptCheckpoint if one is not:
        then this checkpoint is never committed."""
        for file, entry in entries.items():
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key(name, file))
            except ClientError as exc:
                if error_code(exc) in NOT_FOUND:
                    raise CorruptCheckpoint(f"{file} is not in the bucket") from None
                raise
            if head.get("ETag", "").strip('"') != entry[manifest.PUBLISHED]:
                raise CorruptCheckpoint(f"{file} in the bucket is not the object its rank wrote")
            if head.get("ContentLength") != entry["bytes"]:
                raise CorruptCheckpoint(
                    f"{file} in the bucket has {head.get('ContentLength')} bytes"
                )
        return {file: entry[manifest.PUBLISHED] for file, entry in entries.items()}

    def _discard_refused(self, name: str, step: int) -> None:
        """Remove the files a refused upload sent before its bad one (each matched): without a
        manifest they are no checkpoint. A commit of this step already there is left as is."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name, MANIFEST))
            return
        except ClientError as exc:
            if error_code(exc) not in NOT_FOUND:
                return  # unknown: left, as a torn upload is
        except BotoCoreError:
            return
        try:
            if self.owns():
                self.delete(step)
        except (ClientError, BotoCoreError) as exc:  # the refusal is what the caller must see
            log.warning("could not remove the refused %s: %s", name, one_line(exc))

    def _commit(self, name: str, body: bytes, etags_digest: str) -> None:
        """Write a step's manifest, the commit, after its files. With conditional writes it is
        created only if absent (If-None-Match: *): two writers never both commit a step, and an
        existing commit is never overwritten unseen. Found one: either this write, retried by
        botocore after its response was lost (the same bytes: done), or another commit of the
        step, which the owner (checked again) deletes first: an unverifiable copy this upload
        replaces, or a zombie's."""
        key = self.key(name, MANIFEST)
        put = {"Bucket": self.bucket, "Key": key, "Body": body, "ChecksumAlgorithm": "CRC32"}
        put["Metadata"] = {RECEIPT: etags_digest}
        for _ in range(3):
            if not self.conditional:
                self.client.put_object(**put)
                return
            try:
                self.client.put_object(**put, IfNoneMatch="*")
                return
            except ClientError as exc:
                if error_code(exc) == "NotImplemented" or _status(exc) == 501:
                    log.info("%s: no conditional writes; manifests are overwritten", self.url)
                    self.conditional = False
                    continue
                if error_code(exc) != "PreconditionFailed" and _status(exc) != 412:
                    raise
            try:
                there = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if error_code(exc) in NOT_FOUND:
                    continue  # deleted meanwhile: create it
                raise
            if (
                there["Body"].read() == body
                and there.get("Metadata", {}).get(RECEIPT) == etags_digest
            ):
                return
            if not self.owns():
                raise RemoteError(f"{self.url}: another process now owns this run; not committing")
            self.client.delete_object(Bucket=self.bucket, Key=key)
        raise RemoteError(f"{self.url}/{name}: another writer keeps committing this step")

    def download(self, step: int, into: Path, leave_published: bool = False) -> Path:
        """Fetch a remote checkpoint into `into/.download-step-N-*`, verify it, make it durable
        and rename it to `into/step-N`. Only names the manifest lists (checked: no separators)
        become paths. CorruptCheckpoint (one line) if it cannot be read whole, after botocore's
        and the transfer manager's retries, or fails verification; the step is then not counted
        by retention either (spot.checkpoint.upload.remote_problem). `leave_published`: the
        files ranks uploaded themselves are left for each rank to fetch as it reads them
        (spot.checkpoint.parts.ShardSource); copies of them already in `into/step-N` stay there."""
        name = step_dir_name(step)
        staging = into / f".download-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            return self._fetch(name, staging, into, leave_published)
        except CorruptCheckpoint as exc:
            self.unusable[step] = f"download failed: {exc}"
            raise
        finally:
            if staging.exists():
                remove_tree(staging)

    def _fetch(self, name: str, staging: Path, into: Path, leave_published: bool) -> Path:
        # Every object through the transfer manager, the manifest too: it also retries a
        # connection reset while reading a body, which get_object's caller would have to.
        self._fetch_file(name, MANIFEST, staging)
        m = manifest.parse((staging / MANIFEST).read_bytes(), name)
        left = manifest.published(m.files) if leave_published else {}
        for file in m.files:  # names were validated by parse(): a plain file name each
            if (staging / file).resolve().parent != staging.resolve():
                raise CorruptCheckpoint(f"remote manifest names an unsafe file {file!r}")
            if file not in left:
                self._fetch_file(name, file, staging)
        manifest.verify(staging, here=bool(left))  # (what is left is not here)
        final = into / name
        for file in left:  # this node's copies (each rank checks what it reads)
            if (final / file).is_file():
                os.replace(final / file, staging / file)
        fsync_dir(staging)
        if final.exists():
            remove_tree(final)
        os.replace(staging, final)
        fsync_dir(into)
        return final

    def _fetch_file(self, name: str, file: str, staging: Path) -> None:
        target = staging / file
        try:
            self.client.download_file(
                self.bucket, self.key(name, file), str(target), Config=self.transfer
            )
        except (ClientError, BotoCoreError, Boto3Error) as exc:  # after every retry
            raise CorruptCheckpoint(f"remote {file} unreadable ({one_line(exc)})") from None
        fsync_file(target)  # durable before the rename makes the directory a checkpoint

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


class RemoteCheckpoints:
    """A bucket beside the local checkpoint directory, as the CheckpointManager uses it (given to
    its constructor): where a restore also looks, where each commit is copied once uploads have
    started, and the newest verified copy that local retention waits for."""

    def __init__(self, store: S3Store, events: EventLog, alert_after: int):
        self.store = store
        self.events = events
        self.alert_after = alert_after
        self.uploader: Uploader | None = None

    @property
    def url(self) -> str:
        return self.store.url

    def committed_steps(self) -> list[int]:
        return self.store.committed_steps()

    def download(self, step: int, into: Path, leave_published: bool = False) -> Path:
        return self.store.download(step, into, leave_published)

    def complete_commits(self, root: Path, newest_remote: int) -> bool:
        """Node-local disks, sharded, before a restore: rank 0's commits on this disk newer than
        the bucket's newest, whose upload had not finished when the job stopped. Their ranks'
        shards went to the bucket before rank 0 committed, so the upload is finished now (the
        uploader's own steps: every published object checked, the manifest last). Returns
        whether any was; one that cannot be is left (the restore removes it)."""
        for step, path in committed_checkpoints(root):
            if step <= newest_remote:
                break
            began = time.perf_counter()
            try:
                self.store.claim()  # (uploads start after the restore: it claims again)
                sent = self.store.upload(path, step)
            except (CorruptCheckpoint, RemoteError, ClientError, BotoCoreError) as exc:
                log.warning("%s: its upload cannot be finished: %s", path, one_line(exc))
                continue
            seconds = round(time.perf_counter() - began, 6)
            url = f"{self.url}/{step_dir_name(step)}/"
            self.events.emit("upload", step=step, bytes=sent, seconds=seconds, url=url)
            return True  # the newest one is what a restore takes
        return False

    def check_published(self, step: int, files: dict[str, dict]) -> None:
        """CorruptCheckpoint if an object its ranks uploaded is not the one the manifest names
        (then retention does not count the step either)."""
        try:
            self.store.check_published(step_dir_name(step), manifest.published(files))
        except (ClientError, BotoCoreError) as exc:
            self.store.unusable[step] = f"shards unreadable: {one_line(exc)}"
            raise CorruptCheckpoint(f"shards unreadable ({one_line(exc)})") from None
        except CorruptCheckpoint as exc:
            self.store.unusable[step] = str(exc)
            raise

    def start(
        self,
        root: Path,
        keep_last: int,
        on_uploaded: Callable[[int], None],
        spared: Callable[[Collection[int], str], set[int]],
    ) -> Uploader:
        """Claim the run and start uploading. Call it after the restore: a corrupt local
        checkpoint the restore moved aside is then never queued, and a remote one whose download
        failed is not counted. Local checkpoints newer than the newest verified remote one are
        queued now (one at the step of an unverifiable remote copy too: it replaces that copy)."""
        self.store.claim()
        uploader = Uploader(
            self.store, root, self.events, keep_last, self.alert_after, on_uploaded, spared
        )
        self.uploader = uploader
        found = []
        try:
            found = uploader.look()
        except (ClientError, BotoCoreError) as exc:  # then count none: local copies are all kept
            log.warning("could not check the checkpoints in %s: %s", self.url, one_line(exc))
        newest = uploader.newest_uploaded
        in_bucket = {c.step for c in found if c.committed}
        # The best (checkpoint.keep_best) goes too if the bucket lacks it, however old it is: it
        # may have been committed here just before a kill, behind newer uploads.
        best = spared(uploader.verified, "bucket") - in_bucket
        for step, _path in committed_checkpoints(root):
            if newest is None or step > newest or step in best:
                uploader.submit(step)
        return uploader

    def committed(self, step: int) -> None:
        if self.uploader is not None:
            self.uploader.submit(step)

    def newest_uploaded(self) -> int | None:
        """The newest verified remote checkpoint (None before uploads start: keep everything)."""
        return self.uploader.newest_uploaded if self.uploader is not None else None
