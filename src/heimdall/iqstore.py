"""IQ recordings in S3 / MinIO: ``.npy`` complex64 objects, production layout.

Key layout (bucket ``heimdall-raw-iq`` by default): ``sessions/<session_id>/websdr_<station_id>.npy``.
The endpoint comes from HEIMDALL_S3_ENDPOINT_URL (unset = AWS), credentials from boto3's standard
chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws): never from params.yaml.

Errors are split in two: a missing or undecodable *object* is a per-recording problem
(:class:`IQUnavailable`, the caller decides to skip or fail), while anything that would hit every
object (no credentials, access denied, unknown bucket, endpoint down) is a one-line HeimdallError.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np

from heimdall.errors import HeimdallError
from heimdall.simulator import INT16_FULL_SCALE

S3_ENDPOINT_ENV = "HEIMDALL_S3_ENDPOINT_URL"
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class IQUnavailable(Exception):
    """One recording cannot be used; ``kind`` is 'missing' or 'corrupt'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def iq_key(session_id: str, station_id: str) -> str:
    return f"sessions/{session_id}/websdr_{station_id}.npy"


def split_location(location: str, default_bucket: str) -> tuple[str, str]:
    """(bucket, key) of an ``iq_data_location``: a key in the default bucket, or ``s3://bucket/key``."""
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        return bucket, key
    return default_bucket, location.lstrip("/")


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_location(bucket: str, key: str) -> None:
    """IQUnavailable('bad_location') for a location that cannot name one object of the store: an invalid bucket
    name, an empty key, '.'/'..' segments or control characters (one row's fault, never the whole export's)."""
    parts = key.split("/")
    if (not _BUCKET_NAME.match(bucket) or not key or any(p in ("", ".", "..") for p in parts)
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in bucket + key)):
        raise IQUnavailable("bad_location", f"s3://{bucket!r}/{key!r}: not a valid object location")


# An object may hold a longer recording than the export keeps (its first n_samples are used), but one far
# larger than the params imply is not read: up to this many times the complex128 size of n_samples, plus room
# for the .npy header. docs/sources.md.
IQ_OBJECT_SLACK = 64
IQ_HEADER_BYTES = 1 << 20


def max_object_bytes(n_samples: int) -> int:
    return IQ_HEADER_BYTES + IQ_OBJECT_SLACK * 16 * int(n_samples)


class IQStore:
    """A boto3 S3 client for one bucket, created lazily (RSS-only exports never need S3)."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self.endpoint = os.environ.get(S3_ENDPOINT_ENV) or None
        self._client = None
        self._checked: set[str] = set()

    @property
    def where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint or 'AWS'}"

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            if session.get_credentials() is None:
                raise HeimdallError(
                    f"S3 credentials missing for {self.where}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); see docs/sources.md"
                )
            cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                         max_pool_connections=16, s3={"addressing_style": "path"})
            self._client = session.client("s3", endpoint_url=self.endpoint, config=cfg)
        return self._client

    def _fatal(self, e: Exception, bucket: str, what: str) -> HeimdallError:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            detail = f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
        else:
            detail = " ".join(str(e).split())
        return HeimdallError(f"S3 {what} in s3://{bucket} at {self.endpoint or 'AWS'} failed: {detail}")

    def check_bucket(self, bucket: str | None = None) -> None:
        """Fail early (once per bucket) if the bucket cannot be read at all."""
        bucket = bucket or self.bucket
        if bucket in self._checked:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as e:
            raise self._fatal(e, bucket, "access check") from None
        self._checked.add(bucket)

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; IQUnavailable('oversized') without reading it when larger than ``max_bytes``."""
        from botocore.exceptions import BotoCoreError, ClientError

        self.check_bucket(bucket)
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key)
            body, size = resp["Body"], resp.get("ContentLength")
            if max_bytes is None:
                return body.read()
            data = b"" if size is not None and size > max_bytes else body.read(max_bytes + 1)
            if len(data) > max_bytes or not data and size:
                body.close()
                raise IQUnavailable("oversized", f"s3://{bucket}/{key}: {size if size is not None else len(data):,} "
                                    f"bytes, more than the {max_bytes:,} the export's samples imply; not read")
            return data
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in _MISSING_CODES:
                raise IQUnavailable("missing", f"s3://{bucket}/{key}: object not found") from None
            raise self._fatal(e, bucket, f"read of {key}") from None
        except BotoCoreError as e:
            raise self._fatal(e, bucket, f"read of {key}") from None

    def ensure_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in _MISSING_CODES | {"NoSuchBucket"}:
                raise self._fatal(e, self.bucket, "access check") from None
        except BotoCoreError as e:
            raise self._fatal(e, self.bucket, "access check") from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise self._fatal(e, self.bucket, "bucket creation") from None

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as e:
            raise self._fatal(e, self.bucket, f"write of {key}") from None


def encode_npy(iq: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(iq, dtype=np.complex64), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, where: str, n_samples: int) -> np.ndarray:
    """The first ``n_samples`` of a 1-D complex ``.npy`` as complex64, or IQUnavailable('corrupt')."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle downloaded bytes
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/... for damaged files
        raise IQUnavailable("corrupt", f"{where}: not a readable .npy ({type(e).__name__})") from None
    if not isinstance(arr, np.ndarray) or not np.iscomplexobj(arr) or arr.ndim != 1:
        raise IQUnavailable("corrupt", f"{where}: expected a 1-D complex array, got "
                            f"{getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}")
    if arr.shape[0] < n_samples:
        raise IQUnavailable("corrupt", f"{where}: {arr.shape[0]} samples, need {n_samples}")
    arr = arr[:n_samples].astype(np.complex64)
    if not np.isfinite(arr.view(np.float32)).all():
        raise IQUnavailable("corrupt", f"{where}: non-finite samples")
    return arr


def quantize(iq: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """complex (S,) in sqrt(mW) -> (int16 (S, 2) counts, float32 scale), the simulator's rule.

    Peak |I| or |Q| maps to INT16_FULL_SCALE counts, so IQ that came from int16 storage in the
    first place round-trips to the same counts.
    """
    y = np.stack([iq.real, iq.imag], axis=-1).astype(np.float32)
    peak = np.abs(y).max()
    scale = np.float32(peak / np.float32(INT16_FULL_SCALE)) if peak > 0 else np.float32(0.0)
    counts = np.rint(y / (scale if scale > 0 else np.float32(1.0))).astype(np.int16)
    return counts, scale
