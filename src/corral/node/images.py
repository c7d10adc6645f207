"""A node's images: its store (corral.runtime.images) with the node's policy around it.

Pulls and imports are bounded by the node's limits (an image's bytes, the store's size), and an
image is only kept once every layer is unpacked and checked: a hostile layer, a layer that does
not hash to its diff_id or one over the unpack limits leaves nothing of the image behind, and a
sandbox later starts from layers already known to be sound. Everything here blocks: the node
calls it from a thread.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from corral.runtime import images
from corral.runtime.images import (
    Image,
    ImageError,
    ImageStoreFullError,
    ImageTooLargeError,
    RegistryAuth,
)

log = logging.getLogger(__name__)

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ImageInUse(RuntimeError):
    """A sandbox of the node runs on the image's layers: they cannot go."""


class NodeImages:
    def __init__(
        self,
        store_dir: Path,
        *,
        insecure_registries: Iterable[str] = (),
        max_image_bytes: int | None = None,
        store_max_bytes: int = 0,
    ) -> None:
        self.store_dir = store_dir
        self.insecure_registries = tuple(insecure_registries)
        self.max_image_bytes = max_image_bytes
        self.store_max_bytes = store_max_bytes

    def clean(self) -> int:
        """What a pull or import cut short by the node's stop left behind."""
        return images.clean_staging(self.store_dir)

    def _used_bytes(self) -> int:
        blobs = self.store_dir / "blobs" / "sha256"
        if not blobs.is_dir():
            return 0
        return sum(entry.stat().st_size for entry in os.scandir(blobs) if entry.is_file())

    def _budget(self) -> tuple[int | None, bool]:
        """The most a new image may bring, and whether the store's cap (not the per-image
        limit) is what sets it."""
        limit = self.max_image_bytes
        if not self.store_max_bytes:
            return limit, False
        free = max(0, self.store_max_bytes - self._used_bytes())
        if limit is None or free < limit:
            return free, True
        return limit, False

    def _full(self) -> ImageStoreFullError:
        return ImageStoreFullError(
            f"the node's image store is full (it holds at most {self.store_max_bytes} bytes); "
            "remove images first"
        )

    def pull(self, reference: str, auth: RegistryAuth | None = None) -> Image:
        budget, capped = self._budget()
        known = {i.id for i in images.list_images(self.store_dir)}
        try:
            image = images.pull(
                reference, self.store_dir, insecure_registries=self.insecure_registries,
                auth=auth, max_bytes=budget,
            )  # fmt: skip
        except ImageTooLargeError:
            if capped:
                raise self._full() from None
            raise
        except OSError as exc:
            raise self._os_error(exc) from None
        return self._unpacked(image, known)

    def import_archive(self, archive: Path, reference: str | None = None) -> Image:
        size = archive.stat().st_size
        budget, capped = self._budget()
        if budget is not None and size > budget:
            if capped:
                raise self._full()
            raise ImageTooLargeError(f"the archive is {size} bytes, over the limit of {budget}")
        known = {i.id for i in images.list_images(self.store_dir)}
        try:
            image = images.import_archive(archive, self.store_dir, reference=reference)
        except OSError as exc:
            raise self._os_error(exc) from None
        return self._unpacked(image, known)

    def _unpacked(self, image: Image, known: set[str]) -> Image:
        """Unpack every layer now; an image that fails goes (unless it was here before)."""
        try:
            images.layer_dirs(self.store_dir, image)
        except (ImageError, OSError) as exc:
            if image.id not in known:
                try:
                    images.remove_image(self.store_dir, image.id)
                except (ImageError, OSError) as gone:
                    log.warning("image %s: removing it after a failed unpack: %r", image.id, gone)
            if isinstance(exc, OSError) and not isinstance(exc, ImageError):
                raise self._os_error(exc) from None
            raise
        return image

    def _os_error(self, exc: OSError) -> Exception:
        if isinstance(exc, ImageError):
            return exc
        if exc.errno in FULL_ERRNOS:
            return ImageStoreFullError("the node's disk is full: the image could not be stored")
        return exc

    def list(self) -> list[Image]:
        return images.list_images(self.store_dir)

    def get(self, name: str) -> Image:
        return images.get_image(self.store_dir, name)

    def remove(self, name: str, in_use: Callable[[str], list[str]]) -> Image:
        """Remove an image unless `in_use(image id)` names sandboxes running on it."""
        image = images.get_image(self.store_dir, name)
        users = in_use(image.id)
        if users:
            raise ImageInUse(f"image {image.id} is in use by {', '.join(sorted(users))}")
        return images.remove_image(self.store_dir, image.id)
