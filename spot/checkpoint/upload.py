"""Getting committed checkpoints into the bucket: the verified transfer of one checkpoint's files,
and the background queue that decides which checkpoint goes next.

Nothing reaches the bucket that does not match its manifest: each file is read once and hashed
on the way, so the bytes hashed are the bytes sent, and an object becomes visible only after its
bytes matched (a small file is checked before its PUT, a large one's multipart upload is completed
only then). A checkpoint that vanished from disk or does not match is dropped with an event,
never retried: retrying cannot fix it, and it must never hold up the checkpoints after it.
What counts as in the bucket, for both retentions, is what passes `remote_problem`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from spot.buckets import Bucket, NotFound
from spot.checkpoint import manifest
from spot.checkpoint.manifest import MANIFEST, CorruptCheckpoint, step_dir_name
from spot.failpoints import failpoint
from spot.fsutil import HASH_ALGORITHM, digest_bytes, new_hasher
from spot.run.events import EventLog

log = logging.getLogger(__name__)
RECEIPT = "receipt"  # user metadata of a remote manifest (x-amz-meta-receipt): see receipt()


def receipt(etags: dict[str, str]) -> str:
    """One digest of the identities the store reported for a checkpoint's files when its writer
    created them (ETags; GCS: generations); kept in the metadata of the manifest that commits
    them. An object written again gets a new one, so a file replaced after the commit (a zombie writer, a hand edit) shows in a
    listing, without reading it."""
    lines = "".join(f"{file} {etag.strip(chr(34))}\n" for file, etag in sorted(etags.items()))
    return digest_bytes(lines.encode())


def remote_problem(store, c) -> str | None:
    """Why the committed remote checkpoint `c` (a spot.checkpoint.storage.RemoteCheckpoint, listed from
    `store`) cannot be counted on by retention, or None. Reading every byte (what download
    does) is too slow to repeat after each upload, so this is the cheap check: one GET of the
    manifest (its own checksum, its step) and the listing: every file it names is there with
    its size, and none was written again after the commit (the receipt). That catches what
    happens to checkpoints in a bucket: torn or partial copies, files replaced by a zombie
    writer or by hand, a manifest without a receipt (not written by this uploader). Damage
    inside an object never written again is for the store's own checksums; a download in this
    process that failed counts too (store.unusable)."""
    if c.step in store.unusable:
        return store.unusable[c.step]
    name = step_dir_name(c.step)
    try:
        body, metadata = store.bucket.get(store.key(name, MANIFEST))
        m = manifest.parse(body, name)
    except CorruptCheckpoint as exc:
        return str(exc)
    except NotFound:
        return "manifest.json vanished"
    for file, entry in m.files.items():
        size = c.objects.get(file, (None, ""))[0]
        if size is None:
            return f"{file} is missing"
        if size != entry["bytes"]:
            return f"{file} has {size} bytes, manifest says {entry['bytes']}"
    etags = {file: c.objects[file][1] for file in m.files}
    if metadata.get(RECEIPT) != receipt(etags):
        return "files written again after the commit, or no upload receipt"
    return None


def _check(file: str, entry: dict, size: int, digest: str) -> None:
    if size != entry["bytes"]:
        raise CorruptCheckpoint(f"{file} has {size} bytes, manifest says {entry['bytes']}")
    if digest != entry["digest"]:
        raise CorruptCheckpoint(f"{file} fails its {HASH_ALGORITHM} checksum")


def send_files(
    bucket: Bucket, keys: dict[str, str], local_dir: Path, files: dict[str, dict]
) -> dict[str, str]:
    """Upload the files a manifest names (`files`) to `keys`; return each object's identity as
    the store reported it when it was written. CorruptCheckpoint if a file is missing or does
    not match its entry: then no object of it was created, and every multipart upload begun is
    aborted. Parts of all files share the bucket's `concurrency` threads; at most that many
    parts are in memory."""
    slots = threading.BoundedSemaphore(bucket.concurrency)
    open_uploads: dict[str, object] = {}  # key -> its multipart upload, until completed
    pool = ThreadPoolExecutor(bucket.concurrency, thread_name_prefix="bucket-put")

    def start(call: Callable, *args) -> Future:
        slots.acquire()  # released when the request ends: bounds the bytes held in memory
        future = pool.submit(call, *args)
        future.add_done_callback(lambda _: slots.release())
        return future

    def send(file: str, entry: dict) -> Callable[[], str]:
        """Read, hash and start sending one file; the returned function waits and commits it."""
        key, part_size = keys[file], bucket.part_size
        try:
            f = open(local_dir / file, "rb")  # noqa: SIM115 - closed below, before returning
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{file} is missing") from None
        with f:
            if entry["bytes"] <= part_size:  # one PUT, sent only once the bytes matched
                data = f.read(part_size + 1)
                _check(file, entry, len(data), digest_bytes(data))
                put = start(bucket.put, key, data)
                return put.result
            upload = open_uploads[key] = bucket.begin(key)
            hasher, size, parts = new_hasher(), 0, []
            chunk = max(part_size, -(-entry["bytes"] // bucket.max_parts))
            while data := f.read(chunk):
                hasher.update(data)
                size += len(data)
                parts.append(start(bucket.put_part, upload, len(parts) + 1, data))
            _check(file, entry, size, hasher.hexdigest())

        def complete() -> str:
            identity = bucket.complete(upload, [part.result() for part in parts])
            del open_uploads[key]
            return identity

        return complete

    try:
        finish = {file: send(file, entry) for file, entry in files.items()}
        return {file: wait() for file, wait in finish.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for key, upload in open_uploads.items():  # failed or refused: leave no parts behind
            try:
                bucket.abort(upload)
            except Exception as exc:  # the store's lifecycle rules clean up what this cannot
                log.warning("could not abort the multipart upload of %s: %s", key, exc)


class Uploader:
    """Uploads committed checkpoints in the background, newest first, without blocking training.

    Newest first: after an outage, or behind a slow upload, the checkpoint a restart would use
    (the newest; an emergency one is always the newest) goes before the backlog, and a backlog
    entry that remote retention would delete at once (keep_last verified checkpoints newer than
    it are in the bucket) is dropped unsent. The upload in progress is never cut short.

    A checkpoint that vanished or does not match its manifest is dropped (`upload_skipped`).
    Any other failure is retried with backoff (cut short when a newer checkpoint arrives); after
    `alert_after` consecutive failures the run says so loudly (an `upload_failing` event and a
    warning) and keeps the local copies. After each success, retention is applied to the bucket.

    `verified`: the remote steps that passed remote_problem() when last looked at, and those
    this process uploaded since. Only they count, for both retentions."""

    def __init__(
        self,
        store,
        local_root: Path,
        events: EventLog,
        keep_last: int,
        alert_after: int = 3,
        on_uploaded: Callable[[int], None] | None = None,
        spared: Callable[[Collection[int], str], set[int]] = lambda _present, _place: set(),
    ):
        """`spared(present, "bucket")`: the steps retention keeps whatever keep_last says, given
        the verified steps in the bucket (spot.checkpoint.best.BestCheckpoint.spared)."""
        self.store = store  # a spot.checkpoint.storage.RemoteStore
        self.local_root = local_root
        self.events = events
        self.keep_last = keep_last
        self.alert_after = alert_after
        self.on_uploaded = on_uploaded
        self.spared = spared
        self.verified: frozenset[int] = frozenset()  # replaced whole: readers need no lock
        self.failures = 0
        self._newest: int | None = None  # the newest step submitted
        self._pending: set[int] = set()
        self._current: int | None = None
        self._attempts: dict[int, int] = {}
        self._reported: set[tuple[int, str]] = set()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ckpt-upload", daemon=True)
        self._thread.start()

    @property
    def newest_uploaded(self) -> int | None:
        """The newest verified remote checkpoint: local retention may delete what is older."""
        return max(self.verified, default=None)

    def submit(self, step: int) -> None:
        with self._cond:
            self._pending.add(step)  # a step committed again while it is in flight is retried
            self._newest = max(step, self._newest if self._newest is not None else step)
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until every submitted checkpoint is uploaded or dropped;
        return whether the newest one is in the bucket."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._current is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._newest is None or self._newest in self.verified

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay, failed = 0.0, None  # the backoff after `failed` failed
        while True:
            with self._cond:
                resume_at = time.monotonic() + delay
                while True:
                    newest = max(self._pending, default=None)
                    if self._closing or (
                        newest is not None
                        and (failed is None or newest > failed or time.monotonic() >= resume_at)
                    ):
                        break  # a newer checkpoint does not wait out the backoff of an older one
                    self._cond.wait(None if newest is None else resume_at - time.monotonic())
                if self._closing:
                    return
                self._pending.discard(newest)
                self._current = newest
            try:
                retry = self._attempt(newest)
            except Exception as exc:  # never the thread's end: drain() would wait for good
                log.warning("uploading checkpoint %d failed: %s", newest, exc)
                retry = True
            with self._cond:
                self._current = None
                if retry:
                    self._pending.add(newest)
                    delay, failed = min(max(2 * delay, 1.0), 60.0), newest
                else:
                    delay, failed = 0.0, None
                self._cond.notify_all()

    def _skip(self, step: int, reason: str) -> None:
        self.events.emit("upload_skipped", step=step, reason=reason)

    def _attempt(self, step: int) -> bool:
        """Upload one checkpoint, or drop it; True if it failed and should be retried."""
        verified = self.verified
        if step in verified:  # committed again after a restore from an older one
            self._skip(step, "already in the bucket, verified")
            return False
        newer = sum(1 for s in verified if s > step)
        if newer >= self.keep_last and step not in self.spared(verified, "bucket"):
            self._skip(step, f"superseded: {newer} newer verified checkpoints in the bucket")
            return False
        attempts = self._attempts[step] = self._attempts.get(step, 0) + 1
        start = time.perf_counter()
        try:
            sent = self.store.upload(self.local_root / step_dir_name(step), step)
        except CorruptCheckpoint as exc:  # vanished, or does not match: retrying cannot help
            log.warning("not uploading checkpoint %d: %s", step, exc)
            self._skip(step, str(exc))
            return False
        except Exception as exc:  # the store, the network: never fatal here
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
            return True
        self.failures = 0
        self.verified = verified | {step}
        self.events.emit(
            "upload",
            step=step,
            bytes=sent,
            seconds=round(time.perf_counter() - start, 6),
            attempts=attempts,
            url=f"{self.store.url}/{step_dir_name(step)}/",
        )
        failpoint("upload.committed", step)
        self.retain_remote()
        failpoint("upload.retained", step)
        if self.on_uploaded:
            self.on_uploaded(step)
        return False

    def look(self) -> list:
        """Check the bucket's checkpoints, newest first, until `keep_last` verified ones are
        found; update `verified` and report each unverifiable one once (an event). Returns the
        listing (spot.checkpoint.storage.RemoteCheckpoint, newest first)."""
        found = self.store.list_checkpoints()
        verified: list[int] = []
        for c in found:
            if len(verified) == self.keep_last:
                break  # what is older goes at the next retention: no need to read it
            if not c.committed:
                continue  # a torn upload: never counted, replaced or deleted in time
            problem = remote_problem(self.store, c)
            if problem is None:
                verified.append(c.step)
            elif (c.step, problem) not in self._reported:
                self._reported.add((c.step, problem))
                url = f"{self.store.url}/{step_dir_name(c.step)}/"
                log.warning("remote checkpoint %s is not counted: %s", url, problem)
                self.events.emit("remote_unverified", step=c.step, url=url, reason=problem)
        self.verified = frozenset(verified)
        return found

    def retain_remote(self) -> None:
        """Keep the newest `keep_last` verified checkpoints in the bucket; delete every step
        older than the oldest of them (verified or not, committed or not). Nothing is deleted
        until there are keep_last verified ones."""
        try:
            found = self.look()
            kept = sorted(self.verified)
            if len(kept) < self.keep_last:
                return
            # Older than the kept ones: the bests retention spares, if they verify (a best that
            # does not must not spare the one before it), and what is to be deleted.
            older = [c for c in found if c.step < kept[0]]
            present = set(self.verified) | {
                c.step for c in older if c.committed and remote_problem(self.store, c) is None
            }
            spared = self.spared(present, "bucket")
            stale = [c.step for c in older if c.step not in spared]
            if stale and self.store.owns():
                for step in stale:
                    self.store.delete(step)
        except Exception as exc:  # retention is retried after the next upload
            log.warning("remote retention failed (will retry after the next upload): %s", exc)
