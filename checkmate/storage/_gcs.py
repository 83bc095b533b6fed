"""Google Cloud Storage through gcsfs: generation preconditions on multipart uploads.

GCS compares ``ifGenerationMatch`` (0: the object must not exist) on uploads
and deletes. Only the multipart upload path is used: it is correct on GCS and
enforced by fake-gcs-server, whose media and resumable uploads ignore
preconditions. GCS allows about one write per second per object, which the
engine respects when choosing a lease renewal interval.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from ..errors import VersionConflict
from ._cloud import CloudBackend

__all__ = ["GCSBackend"]

_BOUNDARY = "==checkmate=="


class GCSBackend(CloudBackend):
    """gcsfs with generation-match preconditions."""

    min_rewrite_interval = 1.0

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return str(bucket), str(key)

    async def _upload(self, path: str, data: bytes, generation: str) -> str:
        bucket, key = self._split(path)
        meta = json.dumps({"name": key})
        body = (
            (
                f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n"
                f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{_BOUNDARY}--".encode()
        )
        out = await self.fs._call(
            "POST",
            f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
            uploadType="multipart",
            headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'},
            data=body,
            json_out=True,
            ifGenerationMatch=generation,
        )
        self.fs.invalidate_cache(path)
        return str(out["generation"])

    async def _get(self, path: str) -> tuple[bytes, str]:
        bucket, key = self._split(path)
        headers, body = await self.fs._call("GET", "b/{}/o/{}", bucket, key, alt="media")
        return bytes(body), str(headers["X-Goog-Generation"])

    def write(self, path: str, data: bytes) -> None:
        """Unconditional multipart upload."""
        self.fs.pipe_file(path, data)

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Upload only if the generation matches (``0``: absent)."""
        try:
            generation: str = self._run(self._upload, path, data, version or "0")
        except FileExistsError as exc:  # gcsfs maps every HTTP 412 to it
            raise VersionConflict(
                f"conditional write of {path} refused (generation is not {version or 0})",
                obj_name=path,
            ) from exc
        except FileNotFoundError as exc:
            raise VersionConflict(f"conditional write of {path} refused: it is gone") from exc
        return generation

    def delete_if(self, path: str, version: str) -> None:
        """DELETE with ``ifGenerationMatch`` (enforced by GCS; fake-gcs-server ignores it)."""
        bucket, key = self._split(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError) as exc:
            raise VersionConflict(f"conditional delete of {path} refused", obj_name=path) from exc
        finally:
            self.fs.invalidate_cache(path)
