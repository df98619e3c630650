"""S3 through the `minio` SDK: one bucket, multipart uploads, and a SHA-256 for every object.

Every object llmp writes carries its SHA-256 as user metadata (`x-amz-meta-sha256`), computed before
the upload (S3 takes metadata up front), so readers can verify what they download without a second pass
over S3.
The one exception is `upload_file`, for callers that record the digests themselves, like the registry:
it sends the file once, as one streamed PUT that takes the SHA-256, the XXH3-128 and a CRC32 of the very
bytes sent, the CRC32 following the body as an S3 trailing checksum (`x-amz-checksum-crc32`, what AWS's
SDKs send by default): the S3 server computes it too, refuses the upload if they differ, and keeps it
(`server_checksums` reads it back with a HEAD). With `LLMP_S3_UPLOAD_CHECKSUM=sha256` the trailer is the
SHA-256 instead, so S3 itself attests the object's identity, at the price of a SHA-256 pass on the server
(about 0.25 s per 500 MB on a 2-core SeaweedFS, 8 % of the upload).
Other large objects move as parallel multipart uploads; downloads are one GET, hashed as written.
A download that knows the XXH3-128 checks that (~12 GB/s) instead of SHA-256 (~1.5 GB/s), as AWS's SDKs
check CRCs rather than SHA-256 on GET; the SHA-256 stays the object's identity.
The SDK is synchronous: async code calls these methods through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import urllib3
import xxhash
from minio import Minio
from minio import time as s3time
from minio.commonconfig import CopySource
from minio.credentials import Credentials
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.signer import sign_v4_s3

from services.common.config import S3Settings
from services.common.errors import Internal, NotFound, Unavailable

SHA256_META = "sha256"
PART_SIZE = 16 * 1024 * 1024  # multipart part size; S3's minimum is 5 MiB
CHUNK = 1024 * 1024
STREAM_CHUNK = 16 * 1024 * 1024  # aws-chunked chunk of upload_file's PUT: SeaweedFS decodes large chunks cheaper
PARALLEL_PARTS = 4  # parts uploaded at once per object
SINGLE_PUT_LIMIT = 5 * 1024 ** 3  # S3's largest single PUT: larger files go multipart, without a server checksum
CHECKSUM_HEADERS = {"crc32": "x-amz-checksum-crc32", "sha256": "x-amz-checksum-sha256"}  # base64, big-endian
CHECKSUM_BYTES = {"crc32": 4, "sha256": 32}  # raw length of each checksum
UPLOAD_ATTEMPTS = 3  # a streamed PUT is restarted from the file's first byte after a dropped connection or a 5xx


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str
    xxh3_128: str = ""  # hex XXH3-128 of the same bytes, when the writer took it
    crc32: str = ""  # hex CRC32 (IEEE) of the same bytes, when the writer took it or S3 attests it

    def as_dict(self, role: str = "") -> dict:
        return {"key": self.key, "size": self.size, "sha256": self.sha256, **({"role": role} if role else {}),
                **({"xxh3_128": self.xxh3_128} if self.xxh3_128 else {})}


class _HashingFile(io.RawIOBase):
    """A read-only view of an open file that hashes and counts the bytes as they are read, in order."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.fast = xxhash.xxh3_128()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self.fast.update(data)
        self.size += len(data)
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class ObjectStore:
    """The llmp bucket on an S3 server."""

    def __init__(self, settings: S3Settings, *, timeout: float = 30.0) -> None:
        self.bucket = settings.bucket
        self.settings = settings
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=timeout), maxsize=16,
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(settings.endpoint, access_key=settings.access_key, secret_key=settings.secret_key,
                            secure=settings.secure, region=settings.region, http_client=self._http)

    # -- health ---------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as error:
            if error.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise Unavailable(f"S3 bucket {self.bucket}: {error.code}: {error.message}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"S3 unreachable: {error}", retry_after=2) from error

    def check(self) -> None:
        """Readiness: the server answers and the bucket exists."""
        try:
            present = self.client.bucket_exists(self.bucket)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"S3 unreachable: {error}", retry_after=2) from error
        if not present:
            raise Unavailable(f"S3 bucket {self.bucket} does not exist", retry_after=2)

    # -- writes ---------------------------------------------------------------------------------
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> StoredObject:
        """Upload a file with its SHA-256 recorded as metadata (hashed first: S3 wants it up front)."""
        digest = sha256_file(path)
        with open(path, "rb") as handle:
            return self._put(key, handle, os.fstat(handle.fileno()).st_size, digest, content_type)

    def upload_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> StoredObject:
        """Upload a file in one pass, hashing the very bytes sent; no SHA-256 metadata.

        For callers that keep the digests themselves and verify the stored object against them (the
        registry's reserve / upload / commit flow). Up to `SINGLE_PUT_LIMIT` the file goes as one streamed
        PUT whose CRC32 (or SHA-256, per the settings) is its trailing checksum: the server checks it (a
        mismatch fails the PUT) and keeps it for `server_checksums`. Larger files go multipart, with no
        server checksum.
        """
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size <= SINGLE_PUT_LIMIT:
                return self._put_with_checksum(key, handle, size, content_type)
            reader = _HashingFile(handle)
            self._write(key, reader, size, content_type, {})
        if reader.size != size:
            raise Internal(f"{path} changed size while it was uploaded to {key}")
        return StoredObject(key, size, reader.digest.hexdigest(), reader.fast.hexdigest())

    def _put_with_checksum(self, key: str, handle, size: int, content_type: str) -> StoredObject:
        """PUT `size` bytes of `handle` (from its start) as `key` with a trailing checksum; returns the hex
        SHA-256, XXH3-128 and CRC32 of the bytes sent.

        The body is aws-chunked (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`): the file's chunks, then the
        checksum trailer once the last byte has been hashed. One read of the file, bounded memory; the
        server rejects the object unless the bytes it received have that checksum.
        """
        algorithm = self.settings.upload_checksum
        header = CHECKSUM_HEADERS[algorithm]
        chunks = [STREAM_CHUNK] * (size // STREAM_CHUNK) + ([size % STREAM_CHUNK] if size % STREAM_CHUNK else [])
        trailer_length = len(f"0\r\n{header}:\r\n\r\n") + len(base64.b64encode(bytes(CHECKSUM_BYTES[algorithm])))
        encoded = sum(len(f"{n:x}\r\n") + n + 2 for n in chunks) + trailer_length
        settings = self.settings
        url = urlsplit(f"{'https' if settings.secure else 'http'}://{settings.endpoint}/{self.bucket}/"
                       f"{quote(key, safe='/~')}")
        streaming = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
        hashes: dict = {}

        def body() -> Iterator[bytes]:
            handle.seek(0)
            digest, fast, crc = hashlib.sha256(), xxhash.xxh3_128(), 0
            for length in chunks:
                data = handle.read(length)
                if len(data) != length:
                    raise Internal(f"{handle.name} changed size while it was uploaded to {key}")
                digest.update(data)
                fast.update(data)
                crc = zlib.crc32(data, crc)
                yield f"{length:x}\r\n".encode()
                yield data
                yield b"\r\n"
            hashes.update(sha256=digest.hexdigest(), xxh3_128=fast.hexdigest(), crc32=f"{crc:08x}")
            trailer = digest.digest() if algorithm == "sha256" else crc.to_bytes(4, "big")
            yield f"0\r\n{header}:{base64.b64encode(trailer).decode()}\r\n\r\n".encode()

        for _ in range(UPLOAD_ATTEMPTS):
            date = s3time.utcnow()
            headers = sign_v4_s3(
                method="PUT", url=url, region=settings.region, credentials=Credentials(
                    settings.access_key, settings.secret_key), content_sha256=streaming, date=date,
                headers={"Host": url.netloc, "Content-Type": content_type, "Content-Length": str(encoded),
                         "Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(size),
                         "x-amz-trailer": header, "x-amz-content-sha256": streaming,
                         "x-amz-date": s3time.to_amz_date(date)})
            hashes.clear()
            try:
                response = self._http.urlopen("PUT", url.geturl(), body=body(), headers=headers, retries=False)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                failure = Unavailable(f"S3 unreachable while writing {key}: {error}", retry_after=2)
                failure.__cause__ = error
                continue
            if response.status == 200 and hashes:
                return StoredObject(key, size, hashes["sha256"], hashes["xxh3_128"], hashes["crc32"])
            message = f"S3 put {key}: HTTP {response.status}: {response.data[:300]!r}"
            if response.status < 500:
                raise Internal(message)
            failure = Unavailable(message, retry_after=2)
        raise failure

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        return self._put(key, io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest(), content_type)

    def _put(self, key: str, handle, size: int, sha256: str, content_type: str) -> StoredObject:
        self._write(key, handle, size, content_type, {SHA256_META: sha256})
        return StoredObject(key, size, sha256)

    def _write(self, key: str, handle, size: int, content_type: str, metadata: dict[str, str]) -> None:
        try:
            self.client.put_object(self.bucket, key, handle, size, content_type=content_type, part_size=PART_SIZE,
                                   num_parallel_uploads=PARALLEL_PARTS, metadata=metadata or None)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"S3 unreachable while writing {key}: {error}", retry_after=2) from error

    def copy(self, source_key: str, destination_key: str) -> StoredObject:
        """Server-side copy that keeps the recorded SHA-256 (verified present)."""
        source = self.stat(source_key)
        try:
            self.client.copy_object(self.bucket, destination_key, CopySource(self.bucket, source_key))
        except S3Error as error:
            raise Internal(f"S3 copy {source_key} -> {destination_key}: {error.code}") from error
        return StoredObject(destination_key, source.size, source.sha256)

    # -- reads ----------------------------------------------------------------------------------
    def stat(self, key: str) -> StoredObject:
        """Size and the SHA-256 recorded as metadata when llmp wrote the object ("" if it has none)."""
        info = self._stat_object(key)
        metadata = {name.lower(): value for name, value in (info.metadata or {}).items()}
        return StoredObject(key, info.size or 0, metadata.get(f"x-amz-meta-{SHA256_META}", ""))

    def server_checksums(self, key: str) -> StoredObject:
        """Size and the full-object checksums the S3 server itself computed and enforced when the object
        was written: the trailing CRC32 or SHA-256 of an `upload_file` PUT. "" for each the server does not
        keep (multipart uploads, whose S3 checksums are composite, or objects sent without one).
        """
        info = self._stat_object(key, {"x-amz-checksum-mode": "ENABLED"})
        headers = {name.lower(): value for name, value in (info.metadata or {}).items()}
        attested = {}
        if headers.get("x-amz-checksum-type", "FULL_OBJECT").upper() == "FULL_OBJECT":
            for algorithm, header in CHECKSUM_HEADERS.items():
                try:
                    raw = base64.b64decode(headers.get(header, ""), validate=True)
                except binascii.Error:
                    raw = b""
                attested[algorithm] = raw.hex() if len(raw) == CHECKSUM_BYTES[algorithm] else ""
        return StoredObject(key, info.size or 0, attested.get("sha256", ""), crc32=attested.get("crc32", ""))

    def _stat_object(self, key: str, headers: dict[str, str] | None = None):
        try:
            return self.client.stat_object(self.bucket, key, extra_headers=headers)
        except S3Error as error:
            if error.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                raise NotFound(f"object {key} not found") from error
            raise Internal(f"S3 stat {key}: {error.code}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"S3 unreachable: {error}", retry_after=2) from error

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def _get_object(self, key: str, **byte_range: int):
        """The SDK's GET response for `key` (optionally `offset`/`length`), S3 errors as domain errors."""
        try:
            return self.client.get_object(self.bucket, key, **byte_range)
        except S3Error as error:
            if error.code in {"NoSuchKey", "NoSuchObject"}:
                raise NotFound(f"object {key} not found") from error
            raise Internal(f"S3 get {key}: {error.code}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"S3 unreachable: {error}", retry_after=2) from error

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        response = self._get_object(key)
        try:
            yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def download_range(self, key: str, path: Path, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) of `key` into `path` (one ranged GET): a shard of a stored corpus."""
        response = self._get_object(key, offset=offset, length=length)
        try:
            with open(path, "wb") as handle:
                for chunk in response.stream(CHUNK):
                    handle.write(chunk)
        finally:
            response.close()
            response.release_conn()
        if path.stat().st_size != length:
            raise Internal(f"S3 get {key} bytes {offset}+{length}: got {path.stat().st_size} bytes")

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def download(self, key: str, path: Path, expected_sha256: str | None = None, *,
                 expected_size: int | None = None, expected_xxh3_128: str = "") -> StoredObject:
        """Download to `path` atomically, verifying size and digest: the XXH3-128 when the caller knows it
        (taken with the SHA-256 the S3 server verified on upload, so it stands for the same bytes), else the
        SHA-256 (the expected one, else the one recorded on the object).

        One GET, each chunk hashed and written as it arrives (what `fget_object` does, plus the hash):
        on a local S3 server this beats parallel ranged GETs, which cost more CPU than they save. A caller
        that gives the size and a digest saves the HEAD.
        """
        if expected_size is None or not (expected_sha256 or expected_xxh3_128):
            stat = self.stat(key)
            expected_size = stat.size if expected_size is None else expected_size
            expected_sha256 = expected_sha256 or stat.sha256
        fast = bool(expected_xxh3_128)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        digest, size = (xxhash.xxh3_128() if fast else hashlib.sha256()), 0
        try:
            with open(partial, "wb") as handle:
                for chunk in self.iter_chunks(key):
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        expected = expected_xxh3_128 if fast else expected_sha256
        if (expected and digest.hexdigest() != expected) or size != expected_size:
            partial.unlink()
            raise Internal(f"checksum mismatch for {key}: expected {'XXH3-128' if fast else 'SHA-256'} {expected} "
                           f"({expected_size} bytes), got {digest.hexdigest()} ({size} bytes)")
        partial.replace(path)
        if fast:
            return StoredObject(key, size, expected_sha256 or "", digest.hexdigest())
        return StoredObject(key, size, digest.hexdigest())

    def list(self, prefix: str) -> list[StoredObject]:
        """Every object under `prefix` with its size (SHA-256 needs a stat: use `stat` when required)."""
        try:
            return [StoredObject(item.object_name, item.size or 0, "")
                    for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"S3 unreachable: {error}", retry_after=2) from error

    # -- deletes --------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; return how many were deleted."""
        if not prefix or not prefix.endswith("/"):
            raise Internal(f"refusing to delete prefix {prefix!r}: it must end with '/'")
        keys = [DeleteObject(item.key) for item in self.list(prefix)]
        errors = list(self.client.remove_objects(self.bucket, keys)) if keys else []
        if errors:
            raise Internal(f"S3 could not delete {len(errors)} object(s) under {prefix}: {errors[0]}")
        return len(keys)
