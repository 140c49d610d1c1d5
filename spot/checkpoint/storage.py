"""Remote checkpoints in a bucket: S3 and S3-compatible services, Google Cloud Storage, Azure Blob
Storage (the back ends: spot.buckets; everything here is written once for all three).

Layout: <scheme>://<bucket>/<prefix>/<run.name>/<run.id>/step-<9 digits>/<file>, the same files
as on disk. Upload order makes the remote copy atomic too: the components first, `manifest.json` last,
so a reader never sees a manifest whose files are missing; deletion removes the manifest first.
Credentials come from each client's own chain (spot.buckets.open_bucket) and are never logged;
retries are each client's. Uploads check every byte they send against the manifest
(spot.checkpoint.upload); downloads are each client's fastest transfer, verified before the
checkpoint is renamed into place.

A process that is the same run as another (a zombie from before a restart) is fenced: each
process claims the run by writing `owner.json` when it starts, and checks that it still owns it
before every manifest it writes and every deletion. The newest process wins; a zombie stops
uploading. Conditions apply only to the object being written, so that check and the manifest
write cannot be one atomic step; where the service supports conditional writes (S3, GCS, Azure; some
S3-compatible ones do not), the manifest is created only if absent, so a commit is never overwritten unseen, and the upload receipt (see
`receipt`) shows any file written again after a commit. What is left of the race can only
produce a checkpoint that fails verification (files from one writer, manifest from the other),
which retention does not count and resume skips: never a wrong one.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from spot.buckets import (
    Bucket,
    BucketError,
    NotFound,
    PreconditionFailed,
    Unsupported,
    open_bucket,
    parse_url,
    remote_options,
)
from spot.checkpoint import manifest
from spot.checkpoint.manager import committed_checkpoints
from spot.checkpoint.manifest import MANIFEST, STEP_DIR, CorruptCheckpoint, step_dir_name
from spot.checkpoint.upload import RECEIPT, Uploader, receipt, send_files
from spot.failpoints import failpoint
from spot.fsutil import fsync_dir, fsync_file, remove_tree
from spot.run.config import one_line
from spot.run.events import EventLog
from spot.run.identity import COMPLETE

log = logging.getLogger(__name__)
OWNER = "owner.json"


class RemoteError(Exception):
    """The bucket cannot be used; str() is one line naming the bucket and the reason."""


@dataclass
class RemoteCheckpoint:
    step: int
    committed: bool  # a manifest exists
    bytes: int
    modified: float | None
    objects: dict[str, tuple[int, str]] = field(default_factory=dict)  # file: (size, identity)


class RemoteStore:
    """One run's checkpoints under <bucket>/<run_prefix>/."""

    def __init__(self, bucket: Bucket, run_prefix: str):
        self.bucket = bucket
        self.prefix = run_prefix.strip("/")
        self.writer = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Conditional writes (create-if-absent) until the service answers that it has none.
        self.conditional = True
        # Steps whose download in this process failed: not counted, whatever a listing says.
        self.unusable: dict[int, str] = {}

    @property
    def url(self) -> str:
        return self.bucket.url(self.prefix)

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    # ---- access ---------------------------------------------------------------------------

    def check_access(self) -> None:
        """Raise RemoteError (one line, naming the bucket) if the bucket cannot be used."""
        try:
            self.bucket.check_access()
        except BucketError as exc:
            raise RemoteError(str(exc)) from None

    def claim(self) -> None:
        """This process now owns the run: a zombie of an earlier process stops writing."""
        body = json.dumps({"writer": self.writer, "since": time.time()}).encode()
        self.bucket.put(self.key(OWNER), body)

    def owns(self) -> bool:
        try:
            body, _ = self.bucket.get(self.key(OWNER))
            return json.loads(body).get("writer") == self.writer
        except (BucketError, ValueError):
            return False

    # ---- listing --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[RemoteCheckpoint]:
        """Every step-* directory under the run, newest first, committed or not."""
        found: dict[int, RemoteCheckpoint] = {}
        for obj in self.bucket.list(self.key("step-")):
            rest = obj.key[len(self.key()) + 1 :].split("/")
            match = STEP_DIR.match(rest[0]) if len(rest) == 2 else None
            if not match:
                continue
            step = int(match.group(1))
            entry = found.setdefault(step, RemoteCheckpoint(step, False, 0, None))
            entry.bytes += obj.size
            entry.modified = max(entry.modified or 0, obj.modified or 0)
            entry.committed |= rest[1] == MANIFEST
            entry.objects[rest[1]] = (obj.size, obj.identity)
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
                self.bucket,
                {file: self.key(name, file) for file in m.files if file not in elsewhere},
                local_dir,
                {file: entry for file, entry in m.files.items() if file not in elsewhere},
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
                head = self.bucket.head(self.key(name, file))
            except NotFound:
                raise CorruptCheckpoint(f"{file} is not in the bucket") from None
            if head.identity != entry[manifest.PUBLISHED]:
                raise CorruptCheckpoint(f"{file} in the bucket is not the object its rank wrote")
            if head.size != entry["bytes"]:
                raise CorruptCheckpoint(f"{file} in the bucket has {head.size} bytes")
        return {file: entry[manifest.PUBLISHED] for file, entry in entries.items()}

    def _discard_refused(self, name: str, step: int) -> None:
        """Remove the files a refused upload sent before its bad one (each matched): without a
        manifest they are no checkpoint. A commit of this step already there is left as is."""
        try:
            self.bucket.head(self.key(name, MANIFEST))
            return
        except NotFound:
            pass
        except BucketError:
            return  # unknown: left, as a torn upload is
        try:
            if self.owns():
                self.delete(step)
        except BucketError as exc:  # the refusal is what the caller must see
            log.warning("could not remove the refused %s: %s", name, one_line(exc))

    def _commit(self, name: str, body: bytes, etags_digest: str) -> None:
        """Write a step's manifest, the commit, after its files. With conditional writes it is
        created only if absent (If-None-Match: *): two writers never both commit a step, and an
        existing commit is never overwritten unseen. Found one: either this write, retried by
        botocore after its response was lost (the same bytes: done), or another commit of the
        step, which the owner (checked again) deletes first: an unverifiable copy this upload
        replaces, or a zombie's."""
        key = self.key(name, MANIFEST)
        metadata = {RECEIPT: etags_digest}
        for _ in range(3):
            if not self.conditional:
                self.bucket.put(key, body, metadata)
                return
            try:
                self.bucket.put(key, body, metadata, if_absent=True)
                return
            except Unsupported:
                log.info("%s: no conditional writes; manifests are overwritten", self.url)
                self.conditional = False
                continue
            except PreconditionFailed:
                pass
            try:
                there, there_metadata = self.bucket.get(key)
            except NotFound:
                continue  # deleted meanwhile: create it
            if there == body and there_metadata.get(RECEIPT) == etags_digest:
                return
            if not self.owns():
                raise RemoteError(f"{self.url}: another process now owns this run; not committing")
            self.bucket.delete([key])
        raise RemoteError(f"{self.url}/{name}: another writer keeps committing this step")

    def download(self, step: int, into: Path, leave_published: bool = False) -> Path:
        """Fetch a remote checkpoint into `into/.download-step-N-*`, verify it, make it durable
        and rename it to `into/step-N`. Only names the manifest lists (checked: no separators)
        become paths. CorruptCheckpoint (one line) if it cannot be read whole, after the
        client's retries, or fails verification; the step is then not counted by retention either (spot.checkpoint.upload.remote_problem). `leave_published`: the
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
        # Every object through the client's download, the manifest too: boto3's transfer
        # manager also retries a connection reset while reading a body.
        self._fetch_file(name, MANIFEST, staging)
        m = manifest.parse((staging / MANIFEST).read_bytes(), name)
        left = manifest.published(m.files) if leave_published else {}
        for file in m.files:  # names were validated by parse(): a plain file name each
            if (staging / file).resolve().parent != staging.resolve():
                raise CorruptCheckpoint(f"remote manifest names an unsafe file {file!r}")
        wanted = [file for file in m.files if file not in left]
        # The files at once (a GCS or Azure download of one file is one stream or a few).
        with ThreadPoolExecutor(max(1, min(len(wanted), 4)), "bucket-get") as pool:
            for done in [pool.submit(self._fetch_file, name, f, staging) for f in wanted]:
                done.result()  # the first failure, once every download has ended
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
            self.bucket.download(self.key(name, file), target)
        except BucketError as exc:  # after every retry
            raise CorruptCheckpoint(f"remote {file} unreadable ({one_line(exc)})") from None
        fsync_file(target)  # durable before the rename makes the directory a checkpoint

    def delete(self, step: int) -> None:
        """Delete a remote checkpoint, manifest first (it stops existing at once)."""
        name = step_dir_name(step)
        self.bucket.delete([self.key(name, MANIFEST)])
        self.bucket.delete([obj.key for obj in self.bucket.list(self.key(name) + "/")])


def open_store(url: str, **options) -> RemoteStore:
    """The store of a bucket URL (s3://, gs://, az://; spot.buckets.parse_url); `options`:
    open_bucket's (endpoint_url, region, account). RemoteError for a URL that is none."""
    try:
        backend, name, prefix = parse_url(url)
    except ValueError as exc:
        raise RemoteError(str(exc)) from None
    try:
        return RemoteStore(open_bucket(backend, name, **options), prefix)
    except BucketError as exc:
        raise RemoteError(str(exc)) from None


def connect(storage, run_name: str, run_id: str) -> RemoteStore | None:
    """The run's remote store, checked usable (RemoteError otherwise); None for local storage.
    `storage` is the validated StorageConfig."""
    if storage.backend == "local":
        return None
    prefix = "/".join(p for p in (storage.prefix.strip("/"), run_name, run_id) if p)
    try:
        bucket = open_bucket(str(storage.backend), storage.bucket, **remote_options(storage))
    except BucketError as exc:
        raise RemoteError(str(exc)) from None
    store = RemoteStore(bucket, prefix)
    store.check_access()
    return store


def remote_complete(store: RemoteStore) -> bool:
    try:
        store.bucket.head(store.key(COMPLETE))
        return True
    except BucketError:
        return False


def mark_remote_complete(store: RemoteStore, step: int) -> None:
    store.bucket.put(store.key(COMPLETE), f"{step}\n".encode())


class RemoteCheckpoints:
    """A bucket beside the local checkpoint directory, as the CheckpointManager uses it (given to
    its constructor): where a restore also looks, where each commit is copied once uploads have
    started, and the newest verified copy that local retention waits for."""

    def __init__(self, store: RemoteStore, events: EventLog, alert_after: int):
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
            except (CorruptCheckpoint, RemoteError, BucketError) as exc:
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
        except BucketError as exc:
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
        except BucketError as exc:  # then count none: local copies are all kept
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
