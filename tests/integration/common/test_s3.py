import dataclasses
import hashlib
import os
import zlib

import pytest
import xxhash

from services.common import errors, s3
from services.common.config import S3Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def store(settings):
    object_store = s3.ObjectStore(settings.s3)
    object_store.ensure_bucket()
    object_store.ensure_bucket()  # idempotent
    return object_store


def test_multipart_upload_records_sha256(store, tmp_path):
    data = os.urandom(s3.PART_SIZE + 3 * 1024 * 1024)  # forces two parts
    (tmp_path / "source.bin").write_bytes(data)
    stored = store.put_file("t/big.bin", tmp_path / "source.bin")
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.stat("t/big.bin") == stored
    downloaded = store.download("t/big.bin", tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == data and downloaded.sha256 == stored.sha256


def test_download_refuses_a_checksum_mismatch_and_leaves_no_file(store, tmp_path):
    store.put_bytes("t/small", b"hello")
    with pytest.raises(errors.Internal, match="checksum mismatch"):
        store.download("t/small", tmp_path / "small", expected_sha256="0" * 64)
    assert not (tmp_path / "small").exists() and not (tmp_path / "small.partial").exists()


def test_copy_list_and_delete_prefix(store):
    store.put_bytes("p/a", b"a")
    store.put_bytes("p/sub/b", b"bb")
    copied = store.copy("p/a", "q/a")
    assert copied.sha256 == hashlib.sha256(b"a").hexdigest() and store.get_bytes("q/a") == b"a"
    assert sorted(item.key for item in store.list("p/")) == ["p/a", "p/sub/b"]
    assert store.delete_prefix("p/") == 2
    assert store.list("p/") == [] and not store.exists("p/a")
    with pytest.raises(errors.Internal):
        store.delete_prefix("")


def test_missing_object_is_not_found(store):
    with pytest.raises(errors.NotFound):
        store.stat("nope/none")
    with pytest.raises(errors.NotFound):
        store.get_bytes("nope/none")


def test_unreachable_server_is_unavailable():
    from cli.servers import free_port

    dead = s3.ObjectStore(S3Settings(f"127.0.0.1:{free_port()}", "a", "b", False, "us-east-1", "bucket"), timeout=2)
    with pytest.raises(errors.Unavailable):
        dead.check()


@pytest.fixture(params=sorted(s3.CHECKSUM_HEADERS))
def checked_store(request, settings):
    """The store, once per trailing checksum `upload_file` can have the S3 server verify."""
    return s3.ObjectStore(dataclasses.replace(settings.s3, upload_checksum=request.param))


def test_upload_file_hashes_in_one_pass_and_the_server_attests_its_checksum(checked_store, tmp_path, monkeypatch):
    store, algorithm = checked_store, checked_store.settings.upload_checksum
    monkeypatch.setattr(s3, "STREAM_CHUNK", 64 * 1024)
    data = os.urandom(2 * s3.STREAM_CHUNK + 12345)  # whole chunks and a partial one in the aws-chunked body
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    uploaded = store.upload_file("t/one-pass.bin", source)
    assert uploaded.size == len(data) and uploaded.sha256 == hashlib.sha256(data).hexdigest()
    assert store.stat("t/one-pass.bin").sha256 == ""  # no metadata: the caller keeps the digest
    # taken in the same pass
    assert (uploaded.xxh3_128, uploaded.crc32) == (xxhash.xxh3_128(data).hexdigest(), f"{zlib.crc32(data):08x}")
    attested = store.server_checksums("t/one-pass.bin")  # the S3 server's own checksum of what it stored
    if algorithm == "sha256":
        assert attested == s3.StoredObject(uploaded.key, uploaded.size, uploaded.sha256)
    else:
        assert attested == s3.StoredObject(uploaded.key, uploaded.size, "", crc32=uploaded.crc32)
    assert store.get_bytes("t/one-pass.bin") == data
    (tmp_path / "empty").write_bytes(b"")
    empty = store.upload_file("t/empty", tmp_path / "empty")
    assert empty == s3.StoredObject("t/empty", 0, hashlib.sha256(b"").hexdigest(), xxhash.xxh3_128(b"").hexdigest(),
                                    "00000000")
    assert getattr(store.server_checksums("t/empty"), algorithm) == getattr(empty, algorithm)
    store.put_bytes("t/recorded", b"abc")  # metadata only: the server keeps no checksum of its own
    assert store.server_checksums("t/recorded") == s3.StoredObject("t/recorded", 3, "")


def test_the_server_refuses_an_upload_whose_trailing_checksum_is_wrong(checked_store, tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(s3.CHUNK + 1))
    # the trailer no longer matches the bytes sent
    if checked_store.settings.upload_checksum == "sha256":
        monkeypatch.setattr(s3, "hashlib", type("Salted", (), {
            "sha256": staticmethod(lambda: hashlib.sha256(b"salt"))}))
    else:
        monkeypatch.setattr(s3, "zlib", type("Salted", (), {
            "crc32": staticmethod(lambda data, value=0: zlib.crc32(b"salt" + data, value))}))
    with pytest.raises(errors.Internal, match="HTTP 400"):
        checked_store.upload_file("t/refused.bin", source)
    assert not checked_store.exists("t/refused.bin")


def test_upload_file_beyond_the_single_put_limit_goes_multipart_and_download_verifies(store, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "SINGLE_PUT_LIMIT", s3.PART_SIZE)
    monkeypatch.setattr(s3, "PARALLEL_PARTS", 2)  # fewer in flight than there are parts
    data = os.urandom(2 * s3.PART_SIZE + 5 * 1024 * 1024)  # three parts
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    uploaded = store.upload_file("t/one-pass.bin", source)
    assert uploaded.size == len(data) and uploaded.sha256 == hashlib.sha256(data).hexdigest()
    assert store.server_checksums("t/one-pass.bin") == s3.StoredObject("t/one-pass.bin", len(data), "")
    fetched = store.download("t/one-pass.bin", tmp_path / "copy.bin", expected_sha256=uploaded.sha256)
    assert fetched == s3.StoredObject("t/one-pass.bin", len(data), uploaded.sha256)
    assert (tmp_path / "copy.bin").read_bytes() == data
    with pytest.raises(errors.Internal, match="checksum mismatch"):
        store.download("t/one-pass.bin", tmp_path / "bad.bin", expected_sha256="0" * 64)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.partial").exists()
    recorded = store.put_file("t/recorded.bin", source)  # put_file still records the SHA-256 up front
    assert store.stat("t/recorded.bin").sha256 == recorded.sha256 == uploaded.sha256
