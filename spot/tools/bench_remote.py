"""`python -m spot bench --remote URL`: this project's upload and download of one checkpoint
beside the client library's own fastest transfer of the same files to the same bucket, alternating,
for whichever back end the URL names (s3://, gs://, az://; spot.buckets).

The clients' own: boto3's transfer manager (`upload_file`/`download_file`, 8 MiB parts, 10
threads); google-cloud-storage's transfer manager (`upload_many_from_filenames`,
`download_many_to_path`, 10 threads); azure-storage-blob's `upload_blob`/`download_blob` with
`max_concurrency=10`, one file after another. They neither hash what they send against the
manifest nor commit anything: the ratio is what this project's guarantees cost."""

from __future__ import annotations

import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

CONCURRENCY = 10


def measure_remote(ckpt_dir: Path, url: str, remote: dict, repeats: int, timed) -> dict:
    from spot.checkpoint.storage import open_store

    store = open_store(f"{url.rstrip('/')}/spot-bench-{uuid.uuid4().hex[:8]}", **remote)
    store.check_access()
    store.claim()
    step = int(ckpt_dir.name.split("-")[1])
    files = sorted(p for p in ckpt_dir.iterdir() if p.is_file())
    client_prefix = store.key("client")
    results: dict[str, list[float]] = {k: [] for k in ("upload", "client_upload")}
    results.update(download=[], client_download=[])
    try:
        for _ in range(repeats):
            results["upload"].append(timed(partial(store.upload, ckpt_dir, step)))
            results["client_upload"].append(
                timed(partial(_client_upload, store.bucket, files, client_prefix))
            )
            with tempfile.TemporaryDirectory(dir=ckpt_dir.parent) as tmp:
                results["download"].append(timed(partial(store.download, step, Path(tmp))))
            with tempfile.TemporaryDirectory(dir=ckpt_dir.parent) as tmp:
                names = [p.name for p in files]
                fetch = partial(_client_download, store.bucket, names, client_prefix, Path(tmp))
                results["client_download"].append(timed(fetch))
    finally:
        store.bucket.delete([info.key for info in store.bucket.list(store.key())])
    return results


def _client_upload(bucket, files: list[Path], prefix: str) -> None:
    if bucket.scheme == "s3":
        with ThreadPoolExecutor(len(files)) as pool:
            list(
                pool.map(
                    lambda p: bucket.client.upload_file(
                        str(p), bucket.name, f"{prefix}/{p.name}", Config=bucket.transfer
                    ),
                    files,
                )
            )
    elif bucket.scheme == "gs":
        from google.cloud.storage import transfer_manager

        failed = transfer_manager.upload_many_from_filenames(
            bucket.client.bucket(bucket.name),
            [p.name for p in files],
            source_directory=str(files[0].parent),
            blob_name_prefix=f"{prefix}/",
            max_workers=CONCURRENCY,
            worker_type=transfer_manager.THREAD,
        )
        _raise_any(failed)
    else:
        for p in files:
            with open(p, "rb") as f:
                bucket.container.upload_blob(
                    f"{prefix}/{p.name}", f, overwrite=True, max_concurrency=CONCURRENCY
                )


def _client_download(bucket, names: list[str], prefix: str, into: Path) -> None:
    if bucket.scheme == "s3":
        with ThreadPoolExecutor(len(names)) as pool:
            list(
                pool.map(
                    lambda n: bucket.client.download_file(
                        bucket.name, f"{prefix}/{n}", str(into / n), Config=bucket.transfer
                    ),
                    names,
                )
            )
    elif bucket.scheme == "gs":
        from google.cloud.storage import transfer_manager

        failed = transfer_manager.download_many_to_path(
            bucket.client.bucket(bucket.name),
            names,
            destination_directory=str(into),
            blob_name_prefix=f"{prefix}/",
            max_workers=CONCURRENCY,
            worker_type=transfer_manager.THREAD,
        )
        _raise_any(failed)
    else:
        for n in names:
            with open(into / n, "wb") as f:
                bucket.container.download_blob(
                    f"{prefix}/{n}", max_concurrency=CONCURRENCY
                ).readinto(f)


def _raise_any(results: list) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result
