"""The storage layer's guarantees on every back end, each against a real protocol server on
loopback: moto's S3 server, gcp-storage-emulator (GCS's JSON API), Azurite (Blob Storage). The
same checks for all three: verified uploads (multipart ones too), the receipt, a zombie's commit
refused by the service's own precondition, a conditional ranged read, retention, one-line
errors. train.py against GCS and Azure: tests/e2e/test_cloud_storage.py."""

from __future__ import annotations

import contextlib
import os
import uuid
from urllib.parse import unquote

import pytest

from spot.buckets import PreconditionFailed, open_bucket
from spot.checkpoint.manifest import CorruptCheckpoint, step_dir_name
from spot.checkpoint.storage import RemoteError, RemoteStore
from spot.checkpoint.upload import remote_problem
from spot.run.events import EventLog, read_events
from tests import emulators
from tests.faultproxy import FaultProxy
from tests.helpers import CREDENTIALS
from tests.helpers import checkpoint_manager as manager

BACKENDS = ("s3", "gcs", "azure")


@pytest.fixture(scope="module", params=BACKENDS)
def service(request, tmp_path_factory):
    """(backend, endpoint): one server per back end for this module."""
    backend, logs = request.param, tmp_path_factory.mktemp(f"{request.param}-server")
    if backend == "s3":
        from moto.server import ThreadedMotoServer

        port = emulators.free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        yield backend, f"http://127.0.0.1:{port}"
        server.stop()
    elif backend == "gcs":
        with emulators.gcs_emulator(logs / "gcs.log") as endpoint:
            yield backend, endpoint
    else:
        with emulators.azurite(logs / "azurite.log") as endpoint:
            yield backend, endpoint


@pytest.fixture
def bucket(service, monkeypatch):
    """A new, empty bucket (container) of the back end: (backend, endpoint, name)."""
    backend, endpoint = service
    name = f"b-{uuid.uuid4().hex[:12]}"
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    if backend == "azure":
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING", emulators.azurite_connection(endpoint)
        )
    emulators.create_bucket(backend, endpoint, name)
    return backend, endpoint, name


def store_of(bucket, endpoint: str | None = None, **options) -> RemoteStore:
    backend, served, name = bucket
    opened = open_bucket(backend, name, endpoint_url=endpoint or served, **options)
    return RemoteStore(opened, "runs/r/1")


def state(seed: int, size: int = 256) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(size, generator=g)},
        "optimizer": {"m": torch.randn(size, generator=g)},
        "scheduler": {"n": seed},
        "trainer": {"step": seed},
    }


def files_of(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_checkpoint_goes_up_in_parts_and_comes_back_verified(bucket, tmp_path):
    """Files larger than a part go up as parts (S3 multipart, GCS composed parts, Azure blocks);
    the object appears only when completed, and nothing of the parts is left; a fresh machine
    downloads it verified, byte for byte."""
    backend = bucket[0]
    local = manager(tmp_path / "ck", EventLog(None))
    local.save(10, state(10, size=300_000), {})
    store = store_of(bucket)
    if backend != "s3":  # (S3's parts are 5 MiB at least: its multipart is tested elsewhere)
        store.bucket.part_size = 256 * 1024
    store.claim()
    sent = store.upload(tmp_path / "ck" / step_dir_name(10), 10)
    assert sent > 2 * 1024 * 1024
    listed = store.list_checkpoints()
    assert [c.step for c in listed] == [10] and listed[0].committed
    assert remote_problem(store, listed[0]) is None
    keys = {info.key.rsplit("/", 1)[-1] for info in store.bucket.list(store.key(""))}
    assert not any(".parts-" in key for key in keys), keys
    fresh = store_of(bucket)
    path = fresh.download(10, tmp_path / "fresh")
    assert files_of(path) == files_of(tmp_path / "ck" / step_dir_name(10))


def test_a_corrupt_local_checkpoint_is_never_uploaded(bucket, tmp_path):
    local = manager(tmp_path / "ck", EventLog(None))
    local.save(10, state(10, size=300_000), {})
    target = tmp_path / "ck" / step_dir_name(10) / "model.bin"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0x01
    target.write_bytes(bytes(data))
    store = store_of(bucket)
    store.bucket.part_size = max(256 * 1024, 5 * 1024 * 1024 if bucket[0] == "s3" else 0)
    store.claim()
    with pytest.raises(CorruptCheckpoint, match="model.bin"):
        store.upload(tmp_path / "ck" / step_dir_name(10), 10)
    assert store.list_checkpoints() == []  # not a manifest, not one object of it


def test_an_object_written_again_after_the_commit_is_not_counted(bucket, tmp_path):
    """A committed file written again with other bytes of the same size: a new ETag (GCS:
    generation), which the manifest's receipt does not list. Retention does not count it; a new uploader replaces
    it and it verifies again."""
    events = EventLog(tmp_path / "events.jsonl")
    local = manager(tmp_path / "ck", events)
    local.save(10, state(10), {})
    store = store_of(bucket)
    store.claim()
    store.upload(tmp_path / "ck" / step_dir_name(10), 10)
    key = store.key(step_dir_name(10), "model.bin")
    body, _ = store.bucket.get(key)
    store.bucket.put(key, body[:-1] + bytes([body[-1] ^ 1]))
    listed = store.list_checkpoints()[0]
    assert remote_problem(store, listed) == (
        "files written again after the commit, or no upload receipt"
    )
    uploader = manager(tmp_path / "ck", events, store=store_of(bucket)).start_uploads()
    try:
        assert uploader.drain(30)
    finally:
        uploader.close()
    assert remote_problem(store, store.list_checkpoints()[0]) is None
    got = read_events(tmp_path / "events.jsonl")
    assert [e["step"] for e in got if e["event"] == "remote_unverified"] == [10]


@contextlib.contextmanager
def preconditions(bucket):
    """The endpoint to reach the back end at with preconditions served: GCS's emulator ignores
    them, so a proxy in front of it enforces them as GCS does (tests/emulators.py); yields the
    endpoint and the proxy's log (empty for the others, which serve them)."""
    backend, endpoint, _ = bucket
    if backend != "gcs":
        yield endpoint, []
        return
    with FaultProxy(endpoint, emulators.gcs_precondition(endpoint), with_body=True) as proxy:
        yield proxy.url, proxy.log


def test_a_zombie_cannot_replace_a_committed_manifest(bucket, tmp_path, monkeypatch):
    """A zombie that passed its ownership check just before its successor claimed the run: its
    commit of the same step is refused by the service (create-if-absent: S3 and Azure
    If-None-Match, GCS ifGenerationMatch=0), it checks again and stops; the successor's
    manifest stands."""
    with preconditions(bucket) as (served, log):
        zombie, successor = store_of(bucket, served), store_of(bucket, served)
        mine = manager(tmp_path / "zombie", EventLog(None))
        theirs = manager(tmp_path / "successor", EventLog(None))
        mine.save(7, state(1), {})
        theirs.save(7, state(2), {})
        zombie.claim()
        successor.claim()
        successor.upload(tmp_path / "successor" / step_dir_name(7), 7)
        stale = iter([True])
        monkeypatch.setattr(zombie, "owns", lambda: next(stale, None) or RemoteStore.owns(zombie))
        with pytest.raises(RemoteError, match="another process now owns this run"):
            zombie.upload(tmp_path / "zombie" / step_dir_name(7), 7)
        if bucket[0] == "gcs":  # refused by the precondition, not by the owner check alone
            assert any("ifGenerationMatch=0" in p and a == "412" for _, p, a in log)
        committed, _ = successor.bucket.get(successor.key(step_dir_name(7), "manifest.json"))
    assert committed == (tmp_path / "successor" / step_dir_name(7) / "manifest.json").read_bytes()


def test_a_ranged_read_of_an_object_written_again_is_refused(bucket):
    """A rank reads byte ranges of the object the manifest names (its identity): the object
    written again since is refused by the service, never read as if it were the same."""
    with preconditions(bucket) as (served, _):
        store = store_of(bucket, served)
        first = store.bucket.put("k", b"0123456789" * 10)
        assert store.bucket.get_range("k", 10, 20, first) == b"0123456789"
        store.bucket.put("k", b"abcdefghij" * 10)
        with pytest.raises(PreconditionFailed):
            store.bucket.get_range("k", 10, 20, first)
        assert store.bucket.get_range("k", 10, 20) == b"abcdefghij"


def test_retention_keeps_the_newest_in_the_bucket(bucket, tmp_path):
    events = EventLog(tmp_path / "events.jsonl")
    local = manager(tmp_path / "ck", events, keep_last=2, store=store_of(bucket))
    uploader = local.start_uploads()
    try:
        for step in (10, 20, 30, 40):
            local.save(step, state(step), {})
            assert uploader.drain(30)
    finally:
        uploader.close()
    assert [c.step for c in store_of(bucket).list_checkpoints()] == [40, 30]


def test_bad_input_is_one_line(bucket, tmp_path, monkeypatch):
    backend, endpoint, name = bucket
    missing = RemoteStore(open_bucket(backend, f"{name}-none", endpoint_url=endpoint), "r")
    with pytest.raises(RemoteError) as err:
        missing.check_access()
    assert "\n" not in str(err.value) and f"{name}-none" in str(err.value)
    port = emulators.free_port()  # nothing listens there
    if backend == "azure":
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING",
            emulators.azurite_connection(f"http://127.0.0.1:{port}/{emulators.AZURITE_ACCOUNT}"),
        )
    wrong = store_of(bucket, f"http://127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(RemoteError) as err:
        wrong.check_access()
    assert "\n" not in str(err.value) and name in str(err.value)


def test_a_run_url_names_its_newest_verified_checkpoint(bucket, tmp_path):
    """`init.checkpoint` and `python -m spot export` take the bucket's run URL (s3://, gs://,
    az://): its newest checkpoint that downloads verified."""
    from spot.checkpoint.source import load_named

    backend, endpoint, name = bucket
    local = manager(tmp_path / "ck", EventLog(None))
    store = store_of(bucket)
    store.claim()
    for step in (10, 20):
        local.save(step, state(step), {})
        store.upload(tmp_path / "ck" / step_dir_name(step), step)
    scheme = {"s3": "s3", "gcs": "gs", "azure": "az"}[backend]
    loaded, where = load_named(f"{scheme}://{name}/runs/r/1", endpoint_url=endpoint)
    assert loaded.step == 20 and where == f"{scheme}://{name}/runs/r/1/{step_dir_name(20)}"


def test_a_download_damaged_in_flight_is_a_corrupt_checkpoint_in_one_line(bucket, tmp_path):
    """A byte of a file flipped between the service and this machine: the client's own check
    (GCS's CRC32C) or the manifest's xxh3 refuses it; the download is a CorruptCheckpoint (the
    restore then falls back), never an exception of the client's escaping."""
    backend, endpoint, _ = bucket
    local = manager(tmp_path / "ck", EventLog(None))
    local.save(10, state(10, size=4096), {})
    store = store_of(bucket)
    store.claim()
    store.upload(tmp_path / "ck" / step_dir_name(10), 10)

    def rule(method: str, path: str):
        return "flip" if method == "GET" and "model.bin" in unquote(path) else "pass"

    with FaultProxy(endpoint, rule) as proxy:
        if backend == "azure":
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = emulators.azurite_connection(
                f"{proxy.url}/{emulators.AZURITE_ACCOUNT}"
            )
        with pytest.raises(CorruptCheckpoint) as err:
            store_of(bucket, proxy.url).download(10, tmp_path / "fresh")
        assert any(action == "flip" for _, _, action in proxy.log)
    assert "model.bin" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "fresh").glob("step-*"))


def test_an_azure_account_that_is_not_one_is_one_line(monkeypatch):
    """Azure's account: a name of 3-24 lowercase letters and digits, given, or the connection
    string's; one that is a connection string (a key in it) or disagrees with the connection
    string set is refused in one line that does not repeat it."""
    from spot.buckets import AccessError

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    pasted = f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={emulators.AZURITE_KEY}"
    for account in (None, pasted):
        with pytest.raises(AccessError) as err:
            open_bucket("azure", "box", account=account)
        assert "storage.account" in str(err.value) and emulators.AZURITE_KEY not in str(err.value)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", emulators.azurite_connection("http://x"))
    with pytest.raises(AccessError, match="names another account"):
        open_bucket("azure", "box", account="other")
    open_bucket("azure", "box", account=emulators.AZURITE_ACCOUNT)  # the same: fine


def test_an_endpoint_the_client_refuses_is_one_line():
    from spot.buckets import AccessError

    with pytest.raises(AccessError, match="storage.bucket=box: Invalid endpoint"):
        open_bucket("s3", "box", endpoint_url="not an endpoint")


def test_a_url_of_another_back_end_gets_its_own_client_s_defaults():
    """An init.checkpoint in GCS for a run whose storage is MinIO: not MinIO's endpoint."""
    from spot.buckets import remote_options
    from spot.run.config import StorageConfig

    run = StorageConfig(backend="s3", bucket="b", endpoint_url="http://minio:9000")
    assert remote_options(run, "gs://other/run") == {"max_attempts": 5}
    assert remote_options(run, "s3://b/run")["endpoint_url"] == "http://minio:9000"
    local = StorageConfig(endpoint_url="http://minio:9000")  # storage=local: its keys go along
    assert remote_options(local, "s3://b/run")["endpoint_url"] == "http://minio:9000"


def test_a_data_set_of_shards_is_written_and_read_through_each_back_end(bucket, tmp_path):
    """`data write` and data=shards on gs:// and az:// as on s3://: every sample bitwise through
    the cache with prefetch in the shard order; a shard corrupted in the bucket is fetched again,
    then refused in one line."""
    from spot.distributed.sampler import ResumableBatchSampler
    from spot.shards.dataset import ShardedDataset, prefetching
    from spot.shards.format import ShardError
    from spot.shards.write import write
    from tests.unit.test_shards import Samples, assert_same

    backend, endpoint, name = bucket
    url = f"{ {'s3': 's3', 'gcs': 'gs', 'azure': 'az'}[backend] }://{name}/ds"
    data = Samples(200)
    index = write(data, url, 2048, {"endpoint_url": endpoint})
    read = ShardedDataset(url, cache_dir=str(tmp_path / "cache"), endpoint_url=endpoint)
    assert read.identity == f"shards:{index['digest']}"
    sampler = ResumableBatchSampler(len(data), 16, seed=1, groups=read.shard_ends, window=2)
    for batch in prefetching(sampler, read, steps=2):
        for i in batch:
            assert_same(read[i], data[i])
    assert read.fetched_bytes == read.size_bytes

    last = index["shards"][-1]["name"]
    opened = open_bucket(backend, name, endpoint_url=endpoint)
    body = bytearray(opened.get(f"ds/{last}")[0])
    body[5] ^= 1
    opened.put(f"ds/{last}", bytes(body))
    fresh = ShardedDataset(url, cache_dir=str(tmp_path / "other"), endpoint_url=endpoint)
    with pytest.raises(ShardError, match=f"shard {last} does not match its index"):
        fresh[len(fresh) - 1]
