"""Sharded checkpoints on node-local disks: each node keeps its ranks' shards on its own disk, and
the checkpoint meets in the bucket.

With trainer.strategy=fsdp and a run directory that is not the same on every node, no disk holds a
whole checkpoint. Each rank writes its shards on its own node (on rank 0's node, into the
directory rank 0 commits; on another node, into the step's directory there: a part, with no
manifest), then uploads them itself before it reports them to rank 0 (`Publisher.publish`: hashed
on the way, each object completed only once its bytes matched), so every node uploads in
parallel. Its report carries each object's ETag, which rank 0's manifest records; rank 0's
uploader commits the checkpoint in the bucket only once it found each of those objects there,
that object with that size (spot.checkpoint.storage.S3Store.upload). Such a checkpoint exists
once its manifest is in the bucket.

On restore, rank 0 fetches the manifest and the small files; each rank then reads the shards it
needs (`fetch`) from its own disk where the copy there matches the manifest (an unchanged world:
its own file, nothing downloaded), and otherwise from the bucket, checked against the manifest
before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Collection
from pathlib import Path

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from spot.checkpoint.manifest import STEP_DIR, CorruptCheckpoint, step_dir_name
from spot.checkpoint.upload import send_files
from spot.fsutil import digest_file, fsync_file, remove_tree
from spot.run.config import one_line

ETAG = "etag"  # a manifest entry's key: the file is in the bucket, as this object


def published(files: dict[str, dict]) -> dict[str, dict]:
    """The entries of a manifest's files that their ranks put in the bucket themselves."""
    return {file: entry for file, entry in files.items() if ETAG in entry}


class Publisher:
    """One rank's way of getting its shards to the bucket, and where on its disk they stay.
    `own_disk`: this rank's node is not rank 0's (its run directory is another disk), so its
    shards go into the step's directory there, of which the newest `keep` are kept."""

    def __init__(self, store, root: Path, own_disk: bool, keep: int):
        self.store, self.root, self.own_disk, self.keep = store, Path(root), own_disk, keep

    def directory(self, tmp: Path, step: int) -> Path:
        """Where this rank writes its shards of `step`: rank 0's temporary directory on its
        node, the step's own directory on another."""
        return self.root / step_dir_name(step) if self.own_disk else tmp

    def publish(self, directory: Path, files: dict[str, dict], step: int) -> dict[str, dict]:
        """Upload this rank's files (their manifest entries: size, digest) from `directory`;
        return the entries with the ETag of each object as S3 created it."""
        store, name = self.store, step_dir_name(step)
        etags = send_files(
            store.client,
            store.bucket,
            {file: store.key(name, file) for file in files},
            directory,
            files,
            part_size=store.transfer.multipart_chunksize,
            concurrency=store.concurrency,
        )
        return {file: {**entry, ETAG: etags[file].strip('"')} for file, entry in files.items()}

    def prune(self) -> None:
        """On another node's disk: keep the newest `keep` step directories (there the bucket is
        the checkpoint; these copies only spare a download). Every rank of the node may do it
        at once: a directory another rank removed first is gone, as intended."""
        if not self.own_disk or not self.root.is_dir():
            return
        steps = sorted(
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))
        )
        for _step, path in steps[: max(0, len(steps) - self.keep)]:
            with contextlib.suppress(FileNotFoundError):
                remove_tree(path)


def _matches(path: Path, entry: dict) -> bool:
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
        return digest_file(path) == (entry["bytes"], entry["digest"])
    except FileNotFoundError:
        return False


def fetch(store, directory: Path, step: int, files: dict[str, dict], names: Collection[str]):
    """Make each of `names` (files of the manifest `files`) present in `directory` and matching
    its entry: a copy there that matches is used as it is; any other is downloaded from the
    bucket, checked, and renamed into place.
    Returns the names downloaded. CorruptCheckpoint (one line) if one cannot be."""
    directory.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in sorted(names):
        entry = files.get(name)
        if entry is None:
            raise CorruptCheckpoint(f"{name} is not in the manifest of {step_dir_name(step)}")
        target = directory / name
        if _matches(target, entry):
            continue
        part = directory / f".fetch-{name}-{uuid.uuid4().hex[:8]}"  # ranks of a node may race
        try:  # (the transfer manager takes no If-Match: the checksum below is the check)
            key = store.key(step_dir_name(step), name)
            store.client.download_file(store.bucket, key, str(part), Config=store.transfer)
            if not _matches(part, entry):
                raise CorruptCheckpoint(f"{name} in the bucket does not match the manifest")
            fsync_file(part)
            os.replace(part, target)
        except (ClientError, BotoCoreError, Boto3Error) as exc:  # after botocore's retries
            raise CorruptCheckpoint(f"remote {name} unreadable ({one_line(exc)})") from None
        finally:
            part.unlink(missing_ok=True)
        fetched.append(name)
    return fetched
