"""Object storage on a real S3 server (moto, conftest `s3_bucket`): crawl, SQL, fit, resume, embed — all `s3://`.

The project reaches the server only through AWS_ENDPOINT_URL and the standard key variables, as a user
points it at MinIO or R2; Ray's workers (crawl actors, Ray Train workers, Ray Train's `storage_path`) and
DuckDB read and write the same objects.
"""

from __future__ import annotations

import json

import boto3
import pytest

from catalog.__main__ import cli as catalog_cli
from catalog.query import connect
from crawl.__main__ import cli as crawl_cli
from train.__main__ import cli as train_cli


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_missing_bucket_is_one_clear_line(s3_server, capsys, tmp_path):
    import modelfactory

    modelfactory.good_zoo(tmp_path)
    assert crawl_cli(["local", str(tmp_path), "--catalog", "s3://no-such-bucket/cat", "--no-ray"]) == 1
    err = capsys.readouterr().err
    assert "no-such-bucket" in err and "create the bucket first" in err and "Traceback" not in err


@pytest.mark.ray
def test_crawl_sql_fit_resume_and_embed_on_s3(zoo_catalog, s3_bucket, capsys):
    zoo, local_cat = zoo_catalog
    cat, run = f"s3://{s3_bucket}/catalog", f"s3://{s3_bucket}/runs/debug"
    assert crawl_cli(["zoo", str(zoo), "--catalog", cat]) == 0
    assert "96 model(s) crawled (ok 96)" in capsys.readouterr().out
    assert any(k.startswith("catalog/tokens/") and k.endswith(".parquet") for k in _keys(s3_bucket, "catalog/"))
    # DuckDB over the objects: the same rows as the local crawl of the same zoo
    q = "SELECT count(*), sum(n_valid), count(DISTINCT model_id) FROM tokens"
    assert connect(cat).execute(q).fetchone() == connect(str(local_cat)).execute(q).fetchone()
    assert catalog_cli(["sql", cat, "SELECT status, count(*) AS n FROM models GROUP BY status", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["ok,96"]
    assert catalog_cli(["info", cat]) == 0 and "tokens" in capsys.readouterr().out
    # a rerun finds everything done: nothing crawled twice
    assert crawl_cli(["zoo", str(zoo), "--catalog", cat]) == 0
    assert "0 model(s) crawled" in capsys.readouterr().out
    assert connect(cat).execute("SELECT count(*), count(DISTINCT model_id) FROM models").fetchone() == (96, 96)

    # fit with Ray Train's storage_path on S3, then resume from the S3 checkpoint with one more epoch
    fit = ["fit", "--catalog", cat, "--out", run, "--debug", "--workers", "2"]
    assert train_cli([*fit, "--epochs", "1"]) == 0
    keys = _keys(s3_bucket, "runs/debug/")
    assert "runs/debug/model.safetensors" in keys and "runs/debug/config.json" in keys
    assert any(k.startswith("runs/debug/fit/checkpoint_") for k in keys)
    capsys.readouterr()
    assert train_cli([*fit, "--epochs", "2"]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="runs/debug/config.json")["Body"].read()
    assert json.loads(body)["epochs_trained"] == 2

    assert train_cli(["embed", "--run", run, "--catalog", cat]) == 0
    assert connect(cat).execute("SELECT count(DISTINCT model_id) FROM embeddings").fetchone() == (96,)
