"""Azure Blob Storage through adlfs: etag match conditions.

Create uses ``If-None-Match: *``; compare-and-swap and conditional delete use
the blob's etag with ``MatchConditions.IfNotModified``. adlfs does not
translate the SDK's 412 (``ResourceModifiedError``), so it is mapped here.
"""

from __future__ import annotations

from typing import Any

from ..errors import VersionConflict
from ._cloud import CloudBackend

__all__ = ["AzureBackend"]


def _sdk() -> Any:
    import azure.core  # noqa: PLC0415 - optional extra
    import azure.core.exceptions  # noqa: PLC0415

    return azure.core


class AzureBackend(CloudBackend):
    """adlfs with etag conditions."""

    def _split(self, path: str) -> tuple[str, str]:
        container, blob, _ = self.fs.split_path(path)
        return str(container), str(blob)

    async def _get(self, path: str) -> tuple[bytes, str]:
        exc = _sdk().exceptions
        container, blob = self._split(path)
        async with self.fs.service_client.get_blob_client(container=container, blob=blob) as bc:
            try:
                stream = await bc.download_blob()
            except exc.ResourceNotFoundError as err:
                raise FileNotFoundError(path) from err
            data = await stream.readall()
            return bytes(data), str(stream.properties.etag)

    async def _put(self, path: str, data: bytes, version: str | None) -> str:
        sdk = _sdk()
        container, blob = self._split(path)
        if version is None:
            condition: dict[str, Any] = {"overwrite": False}
        else:
            condition = {
                "overwrite": True,
                "etag": version,
                "match_condition": sdk.MatchConditions.IfNotModified,
            }
        async with self.fs.service_client.get_blob_client(container=container, blob=blob) as bc:
            try:
                result = await bc.upload_blob(
                    data=data, metadata={"is_directory": "false"}, **condition
                )
            except (
                sdk.exceptions.ResourceExistsError,
                sdk.exceptions.ResourceModifiedError,
                sdk.exceptions.ResourceNotFoundError,
            ) as err:
                raise VersionConflict(
                    f"conditional write of {path} refused ({type(err).__name__})", obj_name=path
                ) from err
        self.fs.invalidate_cache(self.fs._parent(path))
        return str(result["etag"])

    async def _delete(self, path: str, version: str) -> None:
        sdk = _sdk()
        container, blob = self._split(path)
        async with self.fs.service_client.get_blob_client(container=container, blob=blob) as bc:
            try:
                await bc.delete_blob(
                    etag=version, match_condition=sdk.MatchConditions.IfNotModified
                )
            except (
                sdk.exceptions.ResourceModifiedError,
                sdk.exceptions.ResourceNotFoundError,
            ) as err:
                raise VersionConflict(
                    f"conditional delete of {path} refused ({type(err).__name__})", obj_name=path
                ) from err
        self.fs.invalidate_cache(self.fs._parent(path))

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Upload only if the etag matches (None: only if absent)."""
        etag: str = self._run(self._put, path, data, version)
        return etag

    def delete_if(self, path: str, version: str) -> None:
        """Delete only if the etag matches."""
        self._run(self._delete, path, version)
