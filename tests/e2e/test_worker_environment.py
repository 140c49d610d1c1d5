"""What the workers of train.py's own elastic agent see of the command line's environment: the
forkserver they are forked from starts as soon as the command line composes, before Hydra applies
`hydra.job.env_set`, yet the workers get it (credentials, NCCL_* set there)."""

from __future__ import annotations

import boto3
import pytest

from spot.checkpoint.manifest import step_dir_name
from tests.e2e import test_s3
from tests.helpers import CREDENTIALS, FAST, run_dir_of, run_train, train_env

pytestmark = [pytest.mark.slow, pytest.mark.serial]


s3_endpoint = test_s3.s3_endpoint  # its fixture: moto's S3 server on loopback, per module


def test_forkserver_workers_get_the_credentials_set_by_hydra_env_set(s3_endpoint, tmp_path):
    """No AWS credentials in the environment, only in `hydra.job.env_set`: the agent and both
    forked workers reach the bucket (before the fix the workers said "no AWS credentials found",
    exit 2, while spawned ones, which inherit the agent's environment, trained)."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket="env-set")
    bare = train_env(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    for key in CREDENTIALS:
        bare.pop(key, None)
    result = run_train(
        [
            *FAST,
            "trainer.max_steps=2",
            "elastic.nproc_per_node=2",
            "elastic.start_method=forkserver",
            "storage=s3",
            "storage.bucket=env-set",
            f"storage.endpoint_url={s3_endpoint}",
            f"run.root={tmp_path}",
            *(f"+hydra.job.env_set.{key}={value}" for key, value in CREDENTIALS.items()),
        ],
        env=bare,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no AWS credentials" not in result.stdout + result.stderr
    run_id = run_dir_of(tmp_path).name
    listed = client.list_objects_v2(Bucket="env-set", Prefix=f"checkpoints/default/{run_id}/")
    assert any(o["Key"].endswith(f"/{step_dir_name(2)}/manifest.json") for o in listed["Contents"])
