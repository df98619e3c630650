"""The dataset service end to end over gRPC: real PostgreSQL, real S3, real files."""

import hashlib
import json

import grpc
import numpy as np
import psycopg
import pytest
from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2 as pb
from transformers import PreTrainedTokenizerFast

from services.common.errors import ERROR_TYPE_KEY

from .conftest import UPLOAD_LIMIT, Client

pytestmark = pytest.mark.integration
SPLITS = ["train", "validation", "test", "calibration"]


def error_type(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(ERROR_TYPE_KEY, "")


async def test_shakespeare_becomes_a_ready_verified_version(client, store, shakespeare, tmp_path):
    response = await client.create(shakespeare, name="shakespeare", vocab_size=512)
    version = response.version
    assert response.created and version.state == pb.VERSION_STATE_READY and version.version == 1
    assert [split.name for split in version.splits] == SPLITS
    train = version.splits[0]
    assert train.documents > 800 and train.tokens > train.documents and version.splits[1].documents > 20
    assert version.cleaning.documents_in == sum(s.documents for s in version.splits) + \
        version.cleaning.exact_duplicates + version.cleaning.near_duplicates + version.cleaning.leaked_exact + \
        version.cleaning.leaked_near + version.cleaning.too_short + version.cleaning.too_long
    assert version.tokenizer.kind == "bpe" and version.tokenizer.vocab_size == 512
    assert version.tokenizer.dtype == "uint16" and len(train.shards) >= 2  # 20k-token shards
    prefix = f"datasets/{client.tenant}/shakespeare/v1/"
    assert version.manifest_key == prefix + "manifest.json"

    # every object is in S3 with the recorded size and SHA-256, and nothing else is there
    listed = {obj.key: obj.size for obj in store.list(prefix)}
    assert listed == {obj.key: obj.size for obj in version.objects}
    for obj in version.objects:
        assert hashlib.sha256(store.get_bytes(obj.key)).hexdigest() == obj.sha256

    manifest = json.loads(store.get_bytes(version.manifest_key))
    assert (manifest["name"], manifest["version"], manifest["tenant"]) == ("shakespeare", 1, client.tenant)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 512
    assert manifest["splits"]["train"]["shards"] == list(train.shards)
    assert manifest["splits"]["validation"]["tokens"] == version.splits[1].tokens

    # the tokenizer loads with transformers and decodes the packed validation split back to text
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        store.download(f"{prefix}tokenizer/{name}", tmp_path / "tok" / name)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert tokenizer.eos_token_id == manifest["eos_token_id"] and tokenizer.pad_token_id == manifest["pad_token_id"]
    tokens = np.concatenate([np.frombuffer(store.get_bytes(key), dtype="<u2")
                             for key in manifest["splits"]["validation"]["shards"]])
    assert len(tokens) == version.splits[1].tokens
    assert (tokens == tokenizer.eos_token_id).sum() == version.splits[1].documents
    text = tokenizer.decode(tokens[: np.flatnonzero(tokens == tokenizer.eos_token_id)[0]].tolist())
    assert text and text in shakespeare.decode()

    got = (await client.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name="shakespeare", version=1),
                                               metadata=client.metadata)).version
    assert got == version
    latest = (await client.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name="shakespeare"),
                                                  metadata=client.metadata)).version
    assert latest.version == 1


async def test_same_corpus_and_options_give_the_same_version(client, shakespeare):
    data = shakespeare[:40_000]
    first = await client.create(data, name="idem", tokenizer=pb.TOKENIZER_KIND_CHAR)
    again = await client.create(data, name="idem", tokenizer=pb.TOKENIZER_KIND_CHAR, vocab_size=999)
    assert again.created is False and again.version.version == first.version.version == 1
    assert again.version.digest == first.version.digest
    reseeded = await client.create(data, name="idem", tokenizer=pb.TOKENIZER_KIND_CHAR, split_seed=7)
    assert reseeded.created and reseeded.version.version == 2
    versions = (await client.stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(name="idem"),
                                                      metadata=client.metadata)).versions
    assert [v.version for v in versions] == [2, 1]
    page = await client.stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(
        name="idem", page=common_pb2.PageRequest(page_size=1)), metadata=client.metadata)
    assert [v.version for v in page.versions] == [2] and page.page.next_page_token
    rest = await client.stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(
        name="idem", page=common_pb2.PageRequest(page_size=1, page_token=page.page.next_page_token)),
        metadata=client.metadata)
    assert [v.version for v in rest.versions] == [1] and not rest.page.next_page_token
    datasets = (await client.stub.ListDatasets(pb.ListDatasetsRequest(), metadata=client.metadata)).datasets
    assert [(d.name, d.version_count, d.latest.version) for d in datasets] == [("idem", 2, 2)]


async def test_progress_streams_until_ready(client, shakespeare):
    response = await client.create(shakespeare, name="watched", vocab_size=300, wait=False)
    assert response.version.state == pb.VERSION_STATE_PENDING
    events = [event async for event in client.stub.WatchIngest(
        pb.WatchIngestRequest(name="watched", version=response.version.version), metadata=client.metadata)]
    assert events[-1].state == pb.VERSION_STATE_READY and events[-1].version.state == pb.VERSION_STATE_READY
    assert events[-1].bytes_done == len(shakespeare)
    assert all(event.state == pb.VERSION_STATE_PENDING for event in events[:-1])
    done = [event.bytes_done for event in events]
    assert done == sorted(done)
    # Progress, not just an outcome: phases in pipeline order (a watcher sees the latest state, so a short
    # phase may be skipped), bytes and documents counted along the way
    order = ("receive", "clean", "tokenizer", "pack", "upload", "done")
    seen = list(dict.fromkeys(event.progress.phase for event in events))
    assert sorted(seen, key=order.index) == seen and {"clean", "done"} <= set(seen), seen
    pending = events[:-1]
    assert any(0 < event.bytes_done for event in pending)
    assert any(event.documents_done > 0 for event in pending)
    packed = [event.progress.done for event in events if event.progress.phase == "pack"]
    assert packed == sorted(packed)
    # a finished version answers with one final event
    (final,) = [event async for event in client.stub.WatchIngest(
        pb.WatchIngestRequest(name="watched", version=response.version.version), metadata=client.metadata)]
    assert final.version.digest == response.version.digest


async def assert_nothing_created(client: Client, store, name: str, settings) -> None:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM dataset_versions WHERE tenant = %s AND name = %s",
                            (client.tenant, name)).fetchone()
    assert rows == (0,)
    assert store.list(f"datasets/{client.tenant}/{name}/") == []


@pytest.mark.parametrize("data, options, code, kind, message", [
    (b"good line\nbad \xff byte\n", {}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", "line 2: invalid UTF-8"),
    (b'{"text": "ok"}\n{"text": nope}\n', {"format": pb.CORPUS_FORMAT_JSONL}, grpc.StatusCode.INVALID_ARGUMENT,
     "invalid_argument", "line 2: not valid JSON"),
    (b"\n\n \n", {}, grpc.StatusCode.INVALID_ARGUMENT, "validation_failed", "no documents"),
    (b"x" * (UPLOAD_LIMIT + 1), {}, grpc.StatusCode.RESOURCE_EXHAUSTED, "payload_too_large",
     f"limit of {UPLOAD_LIMIT} bytes"),
    (b"text", {"vocab_size": 10}, grpc.StatusCode.INVALID_ARGUMENT, "validation_failed", "vocab_size"),
    (b"text", {"source_uri": "s3://nobucket-here/none.txt"}, grpc.StatusCode.NOT_FOUND, "not_found", "not found"),
])
async def test_bad_input_is_refused_and_creates_nothing(client, store, dataset_settings, data, options, code, kind,
                                                        message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.create(data, name="bad", **options)
    assert raised.value.code() == code and error_type(raised.value) == kind
    assert message in raised.value.details()
    await assert_nothing_created(client, store, "bad", dataset_settings)


async def test_a_failed_build_leaves_no_objects_and_says_why(client, store, dataset_settings):
    data = b"tiny\n\nwee\n"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.create(data, name="filtered", min_doc_chars=50)
    assert error_type(raised.value) == "validation_failed" and "no training documents" in raised.value.details()
    failed = (await client.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name="filtered", version=1),
                                                  metadata=client.metadata)).version
    assert failed.state == pb.VERSION_STATE_FAILED and "no training documents" in failed.error
    assert not failed.objects and not failed.manifest_key
    assert store.list("datasets/" + client.tenant + "/filtered/") == []
    # the same content can be tried again: a failed version does not hold its address
    with pytest.raises(grpc.aio.AioRpcError):
        await client.create(data, name="filtered", min_doc_chars=50)
    versions = (await client.stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(name="filtered"),
                                                      metadata=client.metadata)).versions
    assert [(v.version, v.state) for v in versions] == [(2, pb.VERSION_STATE_FAILED), (1, pb.VERSION_STATE_FAILED)]


async def test_s3_source(client, store, shakespeare):
    key = f"imports/{client.tenant}/corpus.jsonl"  # the tenant's import prefix, the only place a source is read
    lines = [json.dumps({"text": part}) for part in shakespeare[:30_000].decode().split("\n\n")]
    store.put_bytes(key, "\n".join(lines).encode())
    response = await client.create(b"", name="from-s3", format=pb.CORPUS_FORMAT_JSONL,
                                   tokenizer=pb.TOKENIZER_KIND_CHAR, source_uri=f"s3://{store.bucket}/{key}")
    assert response.version.state == pb.VERSION_STATE_READY
    assert response.version.source_bytes == len("\n".join(lines).encode())
    assert response.version.options.source_uri == f"s3://{store.bucket}/{key}"


async def test_delete_is_refused_while_a_model_uses_the_version(client, store, lineage, shakespeare):
    data = shakespeare[:20_000]
    await client.create(data, name="deletable", tokenizer=pb.TOKENIZER_KIND_CHAR)
    await client.create(data, name="deletable", tokenizer=pb.TOKENIZER_KIND_CHAR, split_seed=1)
    lineage.users[(client.tenant, "deletable", 1)] = ["gpt-small:3"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(name="deletable", version=1),
                                               metadata=client.metadata)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_type(raised.value) == "conflict"
    assert "gpt-small:3" in raised.value.details()
    assert store.list(f"datasets/{client.tenant}/deletable/v1/")

    deleted = await client.stub.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(name="deletable", version=2),
                                                     metadata=client.metadata)
    assert deleted.objects_deleted > 3 and store.list(f"datasets/{client.tenant}/deletable/v2/") == []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name="deletable", version=2),
                                            metadata=client.metadata)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # numbers are never reused
    again = await client.create(data, name="deletable", tokenizer=pb.TOKENIZER_KIND_CHAR, split_seed=1)
    assert again.version.version == 3


async def test_tenants_do_not_see_each_other(client, service, shakespeare):
    await client.create(shakespeare[:10_000], name="private", tokenizer=pb.TOKENIZER_KIND_CHAR)
    other = Client(service, client.tenant + "-other")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await other.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name="private", version=1),
                                           metadata=other.metadata)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await other.stub.ListDatasets(pb.ListDatasetsRequest(), metadata=other.metadata)).datasets == []


async def test_a_call_without_a_tenant_is_unauthenticated(service):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await service.GetDatasetVersion(pb.GetDatasetVersionRequest(name="x", version=1))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
