"""S3 and S3-compatible services (MinIO, R2, Ceph) through boto3. Retries are botocore's
("adaptive": exponential backoff plus client-side rate limiting on throttling); every request
carries a CRC32 that S3 checks; downloads are boto3's transfer manager."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from spot.buckets import (
    AccessError,
    Bucket,
    BucketError,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    Unsupported,
)
from spot.run.config import one_line

for _noisy in ("boto3", "botocore", "s3transfer", "urllib3"):  # their INFO lines are not ours
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _translated(exc: Exception) -> BucketError:
    if isinstance(exc, ClientError):
        code, status = error_code(exc), _status(exc)
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(one_line(exc))
        if code in ("PreconditionFailed", "412") or status == 412:
            return PreconditionFailed(one_line(exc))
        if code == "NotImplemented" or status == 501:
            return Unsupported(one_line(exc))
    return BucketError(one_line(exc))


def _call(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError, Boto3Error) as exc:  # after botocore's retries
        raise _translated(exc) from None


def _with_etag(call: Callable[..., dict], **kwargs) -> dict:
    """`call`'s response, the request sent again (twice at most) while the response lacks the
    ETag S3 always returns: a reply cut off after its status line, which botocore accepts.
    Each is a PUT of the same bytes (or the completion of the same upload): idempotent."""
    for _ in range(3):
        response = _call(call, **kwargs)
        if "ETag" in response:
            return response
    raise BucketError(f"{kwargs['Key']}: S3 replied three times without an ETag")


class S3Bucket(Bucket):
    scheme = "s3"

    def __init__(
        self,
        name: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        concurrency: int = 10,
    ):
        super().__init__(name, concurrency=concurrency)
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
            multipart_threshold=self.part_size,
            multipart_chunksize=self.part_size,
            max_concurrency=concurrency,
            use_threads=True,
        )

    def check_access(self) -> None:
        where = f"storage.bucket={self.name}"
        try:
            self.client.head_bucket(Bucket=self.name)
        except NoCredentialsError:
            raise AccessError(
                f"{where}: no AWS credentials found (environment, profile or instance role)"
            ) from None
        except ClientError as exc:
            code = error_code(exc)
            reason = {
                "404": "does not exist",
                "NoSuchBucket": "does not exist",
                "403": "access denied (credentials refused or no permission)",
            }
            raise AccessError(f"{where}: {reason.get(code, f'unusable ({code})')}") from None
        except BotoCoreError as exc:
            raise AccessError(f"{where}: cannot reach S3 ({exc})") from None

    def put(self, key, data, metadata=None, if_absent=False) -> str:
        put = {"Bucket": self.name, "Key": key, "Body": data, "ChecksumAlgorithm": "CRC32"}
        if metadata:
            put["Metadata"] = metadata
        if if_absent:
            put["IfNoneMatch"] = "*"
        return _with_etag(self.client.put_object, **put)["ETag"].strip('"')

    def get(self, key):
        got = _call(self.client.get_object, Bucket=self.name, Key=key)
        return _call(got["Body"].read), got.get("Metadata", {})

    def get_range(self, key, start, end, identity=None) -> bytes:
        match = {"IfMatch": f'"{identity}"'} if identity else {}
        got = _call(
            self.client.get_object,
            Bucket=self.name,
            Key=key,
            Range=f"bytes={start}-{end - 1}",
            **match,
        )
        return _call(got["Body"].read)

    def head(self, key) -> ObjectInfo:
        head = _call(self.client.head_object, Bucket=self.name, Key=key)
        return ObjectInfo(
            key,
            head.get("ContentLength", 0),
            head.get("ETag", "").strip('"'),
            head["LastModified"].timestamp() if "LastModified" in head else None,
            head.get("Metadata", {}),
        )

    def list(self, prefix) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
                for obj in page.get("Contents", []):
                    modified = obj["LastModified"].timestamp()
                    yield ObjectInfo(
                        obj["Key"], obj["Size"], obj.get("ETag", "").strip('"'), modified
                    )
        except (ClientError, BotoCoreError) as exc:
            raise _translated(exc) from None

    def delete(self, keys) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[i : i + 1000]]
            _call(self.client.delete_objects, Bucket=self.name, Delete={"Objects": batch})

    def download(self, key, path: Path) -> None:
        _call(self.client.download_file, self.name, key, str(path), Config=self.transfer)

    def begin(self, key):
        started = _call(
            self.client.create_multipart_upload,
            Bucket=self.name,
            Key=key,
            ChecksumAlgorithm="CRC32",
        )
        return key, started["UploadId"]

    def put_part(self, upload, number, data):
        key, upload_id = upload
        sent = _with_etag(
            self.client.upload_part,
            Bucket=self.name,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="CRC32",
        )
        part = {"PartNumber": number, "ETag": sent["ETag"]}
        if "ChecksumCRC32" in sent:  # S3 wants each part's checksum back
            part["ChecksumCRC32"] = sent["ChecksumCRC32"]
        return part

    def complete(self, upload, parts) -> str:
        key, upload_id = upload
        return _with_etag(
            self.client.complete_multipart_upload,
            Bucket=self.name,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )["ETag"].strip('"')

    def abort(self, upload) -> None:
        key, upload_id = upload
        _call(self.client.abort_multipart_upload, Bucket=self.name, Key=key, UploadId=upload_id)
