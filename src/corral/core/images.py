"""Images: container images in the stores of the nodes, pulled from registries or imported from
archives, that sandboxes start from.

Each node's store (corral.runtime.images) is the truth for its files; the store table
`node_images` says which node has which image, as the node last said (rewritten from the node's
own list after every pull, import and removal), so that listing and placement need not ask
every node. A sandbox from an image goes to a node that has it, or the image is pulled there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import delete, select

from corral.clock import utcnow
from corral.core.errors import (
    Conflict,
    CorralError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    Unavailable,
)
from corral.core.models import Image, ImagePull, RegistryCredentials, SandboxState
from corral.core.nodes import NodeRegistry
from corral.node.base import HostFailure, Node
from corral.node.directory import NodeDirectory
from corral.node.images import ImageInUse
from corral.node.local import public_reason
from corral.node.protocol import InternalFailure
from corral.runtime import images as store
from corral.store.db import MIGRATION_LOCK_KEY, Database
from corral.store.tables import NodeImageRow, SandboxRow

log = logging.getLogger(__name__)

T = TypeVar("T")
IMAGES_LOCK_KEY = MIGRATION_LOCK_KEY + 0x100  # rewrites of a node's rows in node_images
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RegistryUnauthorized(PermissionDenied):
    code = "registry_unauthorized"


class RegistryFailed(CorralError):
    status, code = 502, "registry_error"


class ImageStoreFull(CorralError):
    status, code = 507, "insufficient_storage"


def _invalid(code: str) -> type[InvalidArgument]:
    return type(f"Invalid_{code}", (InvalidArgument,), {"code": code})


_HOSTILE = _invalid("hostile_layer")
_BAD_LAYER = _invalid("bad_layer")
_UNSUPPORTED = _invalid("unsupported_image")
_BAD_ARCHIVE = _invalid("bad_archive")
_BAD_DIGEST = _invalid("digest_mismatch")


class _TooLarge(PayloadTooLarge):
    code = "image_too_large"


class _UpstreamDigest(RegistryFailed):
    code = "digest_mismatch"


def image_problem(exc: Exception, *, from_registry: bool) -> CorralError:
    """The API's error for a failure of a node's image store (its message is safe to show)."""
    message = str(exc)
    if isinstance(exc, store.ImageNotFoundError):
        return NotFound(message)
    if isinstance(exc, store.RegistryAuthError):
        return RegistryUnauthorized(message)
    if isinstance(exc, store.RegistryError):
        return RegistryFailed(message)
    if isinstance(exc, store.DigestMismatchError):
        # From a registry, what it served is wrong; in an archive, what the caller sent.
        return _UpstreamDigest(message) if from_registry else _BAD_DIGEST(message)
    if isinstance(exc, (store.ImageTooLargeError, store.LayerLimitError)):
        return _TooLarge(message)
    if isinstance(exc, store.ImageStoreFullError):
        return ImageStoreFull(message)
    if isinstance(exc, store.HostileLayerError):
        return _HOSTILE(message)
    if isinstance(exc, store.LayerError):
        return _BAD_LAYER(message)
    if isinstance(exc, store.UnsupportedImageError):
        return _UNSUPPORTED(message)
    if isinstance(exc, store.ImageArchiveError):
        return _BAD_ARCHIVE(message)
    return InvalidArgument(message)  # a malformed reference and the like


def looks_like_id(name: str) -> bool:
    """An image id (sha256:<hex>, or 12+ hex digits of one) rather than a registry reference."""
    bare = name.removeprefix("sha256:")
    hexdigits = len(bare) >= 12 and all(c in "0123456789abcdef" for c in bare)
    return name.startswith("sha256:") or (hexdigits and len(bare) <= 64)


def auth_of(creds: RegistryCredentials | None) -> store.RegistryAuth | None:
    if creds is None:
        return None
    return store.RegistryAuth(
        username=creds.username, password=creds.password, identity_token=creds.token
    )


def _matches(row: NodeImageRow, name: str) -> bool:
    if name == row.image_id or name in row.refs:
        return True
    bare = name.removeprefix("sha256:")
    return len(bare) >= 12 and row.image_id.removeprefix("sha256:").startswith(bare)


class ImageService:
    def __init__(self, db: Database, directory: NodeDirectory, nodes: NodeRegistry) -> None:
        self.db = db
        self.directory = directory
        self.nodes = nodes

    async def _node_for(self, wanted: str | None) -> Node:
        return await self.directory.get(await self.nodes.node_for(self.directory, wanted))

    async def _guard(self, work: Awaitable[T], *, from_registry: bool) -> T:
        """Run a node's image call, its failures as the API's errors (never a 500)."""
        try:
            return await work
        except CorralError:
            raise
        except ImageInUse as exc:
            raise Conflict(str(exc)) from None
        except store.ImageError as exc:
            raise image_problem(exc, from_registry=from_registry) from None
        except (HostFailure, InternalFailure, OSError) as exc:
            log.warning("an image operation failed on the node: %r", exc)
            raise Unavailable(f"the node could not do it: {public_reason(exc)}") from None
        except Exception:
            # A bug of the store, not of the request: logged whole, answered without details.
            log.exception("an image operation failed unexpectedly")
            raise Unavailable("the node's image store failed; its log has the error") from None

    # --- the table of what each node holds ---

    async def sync(self, node: Node) -> None:
        """Rewrite the node's rows from its own list of images."""
        found = await self._guard(node.list_images(), from_registry=False)
        now = utcnow()
        async with self.db.transaction() as session:
            await self.db.serialize(session, IMAGES_LOCK_KEY)  # two replicas rewriting at once
            old = {
                r.image_id: r
                for r in await session.scalars(
                    select(NodeImageRow).where(NodeImageRow.node_id == node.id)
                )
            }
            await session.execute(delete(NodeImageRow).where(NodeImageRow.node_id == node.id))
            await session.flush()
            for image in found:
                before = old.get(image.id)
                session.add(
                    NodeImageRow(
                        node_id=node.id,
                        image_id=image.id,
                        refs=list(image.references),
                        record=image.to_json(),
                        size=image.size,
                        added_at=before.added_at if before is not None else now,
                    )
                )

    async def _rows(self, node_id: str | None = None) -> list[NodeImageRow]:
        query = select(NodeImageRow).order_by(NodeImageRow.node_id, NodeImageRow.image_id)
        if node_id is not None:
            query = query.where(NodeImageRow.node_id == node_id)
        async with self.db.session() as session:
            return list(await session.scalars(query))

    async def _users(self) -> dict[tuple[str, str], list[str]]:
        """(node, image id) -> the live sandboxes of that node that run on it."""
        live = SandboxRow.state != SandboxState.deleted.value
        query = select(SandboxRow.id, SandboxRow.node_id, SandboxRow.spec).where(live)
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        users: dict[tuple[str, str], list[str]] = {}
        for sandbox_id, node_id, spec in rows:
            image = spec.get("image")
            if isinstance(image, dict) and image.get("id"):
                users.setdefault((node_id, str(image["id"])), []).append(sandbox_id)
        return users

    def _model(self, node_id: str, image: store.Image, added_at: object, users: list[str]) -> Image:
        return Image(
            id=image.id,
            references=list(image.references),
            node_id=node_id,
            size=image.size,
            layers=len(image.layers),
            created=image.created,
            architecture=image.architecture,
            os=image.os,
            env=list(image.env),
            working_dir=image.working_dir,
            user=image.user,
            entrypoint=list(image.entrypoint),
            cmd=list(image.cmd),
            labels=dict(image.labels),
            added_at=added_at,  # type: ignore[arg-type]
            used_by=sorted(users),
        )

    async def _row_model(
        self, row: NodeImageRow, users: dict[tuple[str, str], list[str]] | None = None
    ) -> Image:
        users = users if users is not None else await self._users()
        image = store.Image.from_json(row.record)
        return self._model(row.node_id, image, row.added_at, users.get((row.node_id, image.id), []))

    async def _stored(self, node_id: str, image_id: str) -> Image:
        for row in await self._rows(node_id):
            if row.image_id == image_id:
                return await self._row_model(row)
        raise NotFound(f"image {image_id} is not on node {node_id}")  # removed meanwhile

    # --- the API's operations ---

    async def pull(self, req: ImagePull) -> Image:
        if req.reference.startswith("sha256:"):
            raise InvalidArgument(
                "a pull takes a reference (host[:port]/name[:tag|@sha256:...]), not an image id",
                details=[{"loc": ["body", "reference"], "msg": "an image id"}],
            )
        node = await self._node_for(req.node)
        image = await self._guard(
            node.pull_image(req.reference, auth_of(req.auth)), from_registry=True
        )
        await self.sync(node)
        return await self._stored(node.id, image.id)

    async def import_archive(
        self, archive: Path, *, reference: str | None, node_id: str | None
    ) -> Image:
        node = await self._node_for(node_id)
        image = await self._guard(node.import_image(archive, reference), from_registry=False)
        await self.sync(node)
        return await self._stored(node.id, image.id)

    async def list(self, node_id: str | None = None) -> list[Image]:
        users = await self._users()
        return [await self._row_model(r, users) for r in await self._rows(node_id)]

    async def _matching(self, name: str, node_id: str | None) -> list[NodeImageRow]:
        found = [r for r in await self._rows(node_id) if _matches(r, name)]
        if not found:
            where = f" on node {node_id}" if node_id else ""
            raise NotFound(f"no image {name[:200]!r}{where}")
        return found

    async def get(self, name: str, node_id: str | None = None) -> Image:
        """By id, id prefix or reference; the first node's when several have it."""
        return await self._row_model((await self._matching(name, node_id))[0])

    async def delete(self, name: str, node_id: str | None = None) -> None:
        """Remove the image from every node that has it (or from `node_id`'s only); refused,
        with nothing removed, while a live sandbox runs on it."""
        rows = await self._matching(name, node_id)
        users = await self._users()
        using = sorted(s for r in rows for s in users.get((r.node_id, r.image_id), []))
        if using:
            raise Conflict(
                f"image {name[:200]!r} is in use by {', '.join(using)}: delete them first"
            )
        for row in rows:
            node = await self.directory.get(row.node_id)
            try:
                await self._guard(node.remove_image(row.image_id), from_registry=False)
            except NotFound:
                pass  # gone from the node already: its row goes below
            await self.sync(node)

    # --- for sandboxes ---

    async def holders(self, name: str) -> list[str]:
        """The nodes that have the image, as far as the store knows."""
        return sorted({r.node_id for r in await self._rows() if _matches(r, name)})

    async def ensure(self, node: Node, name: str) -> store.Image:
        """The image on `node`, pulled there first if it is a reference the node lacks."""
        try:
            return await node.get_image(name)
        except store.ImageNotFoundError:
            pass
        except Exception as exc:
            await self._guard(_raise(exc), from_registry=False)
        if looks_like_id(name):
            raise InvalidArgument(
                f"no image {name!r} on node {node.id}; pull it there by reference",
                details=[{"loc": ["body", "image"], "msg": "unknown image"}],
            )
        try:
            image = await self._guard(node.pull_image(name), from_registry=True)
        except (
            NotFound,
            PermissionDenied,
            RegistryFailed,
            PayloadTooLarge,
            InvalidArgument,
        ) as exc:
            # The create's argument cannot be had: a 422 naming `image`, with the pull's own
            # code and reason (a full store or an unreachable node stay what they are).
            raise _bad_image(exc.code)(
                exc.message, details=[{"loc": ["body", "image"], "msg": exc.code}]
            ) from None
        await self.sync(node)
        return image


_BAD_IMAGES: dict[str, type[InvalidArgument]] = {}


def _bad_image(code: str) -> type[InvalidArgument]:
    """An InvalidArgument with another code (one class per code, made once)."""
    if code not in _BAD_IMAGES:
        _BAD_IMAGES[code] = _invalid(code)
    return _BAD_IMAGES[code]


async def _raise(exc: Exception) -> None:
    raise exc


def env_pairs(entries: Iterable[str]) -> dict[str, str]:
    """An image's `NAME=value` list as a mapping (an entry without `=` is an empty value)."""
    env: dict[str, str] = {}
    for entry in entries:
        name, _, value = str(entry).partition("=")
        if _ENV_NAME.fullmatch(name) and "\0" not in value:
            env[name] = value
    return env
