"""Sources named by fsspec URLs, without a network: the spec type (form, credentials, options),
identities, listings and image paths under a prefix on fsspec's in-process `memory://` store."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tests.conftest import encode
from vlmflow.component import digest_view
from vlmflow.components.sources.base import SOURCES, RawRow, SourceContext, input_files, read_dataset_image
from vlmflow.errors import UserError
from vlmflow.fingerprint import fingerprint_value
from vlmflow.remote import URL, identity
from vlmflow.specs.data import ParquetSource, UrlListSource, WebDatasetSource


def webdataset(tmp_path: Path, **fields) -> WebDatasetSource:
    return WebDatasetSource.model_validate({"kind": "webdataset", **fields}, context={"spec_dir": tmp_path})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("s3://AKIA:Sh0wMe@bucket/shards/", "AWS_ACCESS_KEY_ID"),
        ("s3://AKIA@bucket/shards/", "AWS_PROFILE"),
        ("s3://bucket/x.tar?X-Amz-Signature=Sh0wMe", "credentials never go in a spec"),
        ("file:///etc/shards", "write a local file as a path"),
        ("nosuchfs://bucket/x", "fsspec knows no protocol 'nosuchfs'"),
        ("s3://", "no bucket or path"),
        ("simplecache::s3://bucket/x", "chained fsspec URLs"),
    ],
)
def test_bad_urls_are_located_errors_without_the_secret(tmp_path, path, message):
    with pytest.raises(ValidationError) as caught:
        webdataset(tmp_path, path=path)
    (error,) = caught.value.errors()
    assert error["loc"] == ("path",) and message in error["msg"]
    assert "Sh0wMe" not in error["msg"] and "AKIA" not in error["msg"]


def test_storage_options_hold_no_secret_and_only_s3_settings(tmp_path):
    for secret in ({"key": "K"}, {"secret": "S"}, {"aws_secret_access_key": "S"}, {"client_kwargs": {}}):
        with pytest.raises(ValidationError, match="AWS_PROFILE") as caught:
            webdataset(tmp_path, path="s3://b/x.tar", storage_options=secret)
        assert caught.value.errors()[0]["loc"] == ("storage_options",)
    with pytest.raises(ValidationError, match="storage_options apply to s3:// URLs"):
        webdataset(tmp_path, path="memory://b/x.tar", storage_options={"anon": True})
    options = {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "profile": "lab", "anon": True}
    spec = webdataset(tmp_path, path="s3://b/shards/", storage_options=options)
    assert spec.path.options == {
        "anon": True,
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "profile": "lab",
    }
    assert pickle.loads(pickle.dumps(spec)).path.options == spec.path.options  # Ray ships specs to workers
    dumped = spec.model_dump(mode="json")
    assert dumped["path"] == "s3://b/shards/" and type(dumped["path"]) is str
    assert "storage_options" not in digest_view(spec)  # operational: ETags decide what was read


def test_local_paths_keep_their_checks(tmp_path):
    with pytest.raises(ValidationError, match="path does not exist"):
        webdataset(tmp_path, path="missing.tar")
    (tmp_path / "list.csv").write_text("url,caption\n")
    with pytest.raises(ValidationError, match="not a file"):
        UrlListSource.model_validate({"kind": "url-list", "path": "."}, context={"spec_dir": tmp_path})
    spec = UrlListSource.model_validate({"kind": "url-list", "path": "list.csv"}, context={"spec_dir": tmp_path})
    assert spec.path == tmp_path / "list.csv"
    with pytest.raises(ValidationError, match=r"expected a \.parquet, \.csv or \.jsonl"):
        UrlListSource.model_validate({"kind": "url-list", "path": "s3://b/list.txt"})


def test_identity_prefers_the_etag_and_keeps_the_version():
    info = {"ETag": '"abc"', "size": 10, "VersionId": "v1", "LastModified": "2026-01-01"}
    assert identity(info) == {"size": 10, "etag": '"abc"', "version": "v1"}
    assert identity({"md5Hash": "m", "size": 3, "generation": 7}) == {"size": 3, "etag": "m", "version": "7"}


@pytest.fixture
def store():
    """fsspec's memory filesystem (in this process), emptied afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/ds", recursive=True) if fs.exists("/ds") else None


def test_listing_and_fingerprint_of_a_prefix(store):
    store.pipe({"/ds/a/one.parquet": b"1", "/ds/a/b/two.parquet": b"22", "/ds/a/notes.txt": b"x"})
    url = URL.parse("memory://ds/a")
    files = input_files(url, ".parquet")
    assert [(str(f.location), f.prefix) for f in files] == [
        ("memory:///ds/a/b/two.parquet", "b_two"),
        ("memory:///ds/a/one.parquet", "one"),
    ]
    before = fingerprint_value({"path": url})["path"]
    assert [name for name, _ in before["objects"]] == ["b/two.parquet", "notes.txt", "one.parquet"]
    store.pipe("/ds/a/one.parquet", b"3")  # same size, new bytes: the memory store has no ETag: hashed
    assert fingerprint_value({"path": url})["path"] != before
    with pytest.raises(UserError, match=r"no \.tar files in this prefix"):
        input_files(url, ".tar")


def test_image_paths_stay_under_the_prefix(store):
    store.pipe({"/ds/imgs/a.png": b"png!", "/ds/secret.png": b"nope", "/ds/imgs/big.png": b"x" * 100})
    root = URL.parse("memory://ds/imgs")
    assert read_dataset_image(root, "a.png", False, 50) == (b"png!", "", "")
    assert read_dataset_image(root, "../secret.png", False, 50)[1] == "path-outside-dataset"
    assert read_dataset_image(root, "memory://ds/secret.png", False, 50)[1] == "path-outside-dataset"
    assert read_dataset_image(root, "../secret.png", True, 50) == (b"nope", "", "")
    assert read_dataset_image(root, "big.png", False, 50)[1] == "too-large"
    assert read_dataset_image(root, "gone.png", False, 50)[1] == "missing-image-file"


def test_parquet_source_reads_a_remote_file(store, photos):
    image = encode(photos["coffee"][::8, ::8])
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [image, None], "caption": ["coffee", "none"]}), buffer)
    store.pipe("/ds/t.parquet", buffer.getvalue())
    spec = ParquetSource.model_validate({"kind": "parquet", "path": "memory://ds/t.parquet"})
    ctx = SourceContext("p", 0, 10)
    (unit,) = SOURCES.get("parquet").plan(spec, ctx)
    produced = list(SOURCES.get("parquet").read(spec, ctx, unit))
    assert isinstance(produced[0], RawRow) and produced[0].image == image and produced[0].captions == ["coffee"]
    assert (produced[1].key, produced[1].reason) == ("t-1", "no-image")
