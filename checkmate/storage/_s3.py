"""S3 through s3fs: conditional PUT (If-None-Match / If-Match) and conditional DELETE.

Error shapes differ between servers: AWS and moto name the failed condition
in a 412 (s3fs then raises FileExistsError), SeaweedFS does not (s3fs raises
OSError(EINVAL)); a 409 ConditionalRequestConflict means "concurrent
conditional writes raced: try again". Errors are classified by the botocore
error code that s3fs keeps as the exception's cause.
"""

from __future__ import annotations

from ..errors import VersionConflict
from ._cloud import CloudBackend

__all__ = ["S3Backend"]


def _error_code(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        cause = cause.__cause__
    return ""


class _RaceError(OSError):
    """HTTP 409 from concurrent conditional requests: transient, retry."""


def _classify(exc: Exception, path: str, expected: str | None) -> Exception:
    code = _error_code(exc)
    if isinstance(exc, FileExistsError) or code in {"PreconditionFailed", "412"}:
        why = "it already exists" if expected is None else "its version changed"
        return VersionConflict(f"conditional write of {path} refused: {why}", obj_name=path)
    if code in {"ConditionalRequestConflict", "409", "OperationAborted"}:
        return _RaceError(f"concurrent conditional requests on {path}; retry")
    if isinstance(exc, FileNotFoundError) and expected is not None:
        return VersionConflict(f"conditional write of {path} refused: it is gone", obj_name=path)
    return exc


class S3Backend(CloudBackend):
    """s3fs with native conditional requests (any store that passes the self-test)."""

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return str(bucket), str(key)

    async def _put(self, path: str, data: bytes, condition: dict[str, str]) -> str:
        bucket, key = self._split(path)
        out = await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        self.fs.invalidate_cache(path)
        return str(out["ETag"])

    async def _get(self, path: str) -> tuple[bytes, str]:
        bucket, key = self._split(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            data = await body.read()
        return bytes(data), str(response["ETag"])

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """PUT with ``If-None-Match: *`` (version None) or ``If-Match: <etag>``."""
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            etag: str = self._run(self._put, path, data, condition)
        except Exception as exc:
            raise _classify(exc, path, version) from exc
        return etag

    def delete_if(self, path: str, version: str) -> None:
        """DELETE with ``If-Match: <etag>``."""
        bucket, key = self._split(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except Exception as exc:
            raise _classify(exc, path, version) from exc
        finally:
            self.fs.invalidate_cache(path)
