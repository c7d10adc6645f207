"""The node's image store on disk: pulling and importing through skopeo into a staging OCI
layout, verifying every digest, committing blobs into one content-addressed blob store, image
records, removal with garbage collection, and the per-layer unpacked dirs.

Layout of `store_dir` (0700, root's):

    blobs/sha256/<hex>          every manifest, config and layer blob, once per node
    images/<config hex>.json    one record per image: its references and parsed config
    layers/<diff_id hex>/root   a layer unpacked in overlayfs lower-dir format
    layers/<diff_id hex>/layer.json   what unpacking wrote (LayerStats)
    tmp/                        staging layouts and half-unpacked layers, removed on failure
    lock                        flock(2) held while blobs, records or layers are committed/removed
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from corral.runtime.images import skopeo
from corral.runtime.images.errors import (
    DigestMismatchError,
    ImageArchiveError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    LayerLimitError,
    UnsupportedImageError,
)
from corral.runtime.images.skopeo import RegistryAuth
from corral.runtime.images.unpack import LayerStats, UnpackLimits, unpack_layer

STAGING_TAG = "image"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
# platform.machine() -> the OCI/Go architecture names
ARCHITECTURES = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}  # fmt: skip
CHUNK = 1 << 20


def host_architecture() -> str:
    machine = platform.machine()
    return ARCHITECTURES.get(machine, machine)


@dataclass(frozen=True)
class Image:
    """One image in the node's store. `id` is the config's digest (`sha256:<hex>`)."""

    id: str
    manifest_digest: str
    references: tuple[str, ...]
    size: int  # bytes of manifest, config and (compressed) layers
    created: str | None  # the config's RFC 3339 time, as the image says
    layers: tuple[str, ...]  # layer blob digests, bottom first
    diff_ids: tuple[str, ...]  # uncompressed layer digests, bottom first
    layer_media_types: tuple[str, ...]
    architecture: str
    os: str
    env: tuple[str, ...] = ()  # "NAME=value", as in the config
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for k in (
            "references",
            "layers",
            "diff_ids",
            "layer_media_types",
            "env",
            "entrypoint",
            "cmd",
        ):
            known[k] = tuple(known.get(k) or ())
        return cls(**known)


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.images = root / "images"
        self.layers = root / "layers"
        self.tmp = root / "tmp"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # setuid files of images live below: no host user may reach them
        for d in (self.blobs, self.images, self.layers, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with (self.root / "lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def staging(self, kind: str) -> Iterator[Path]:
        path = self.tmp / f"{kind}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def blob(self, digest: str) -> Path:
        return self.blobs / _hex(digest)

    def seed(self, layout: Path) -> None:
        """Hard-link every blob the node has into a staging layout, so that skopeo's copy skips
        the ones already here (it reuses a blob that exists at its path) and fetches only the
        new ones."""
        (layout / "blobs" / "sha256").mkdir(parents=True)
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        for blob in self.blobs.iterdir():
            with contextlib.suppress(FileNotFoundError):
                os.link(blob, layout / "blobs" / "sha256" / blob.name)

    def records(self) -> list[Image]:
        found = []
        for path in sorted(self.images.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError):
                found.append(Image.from_json(json.loads(path.read_text())))
        return found

    def write_record(self, image: Image) -> None:
        tmp = self.tmp / f"record-{secrets.token_hex(6)}"
        tmp.write_text(json.dumps(image.to_json(), indent=1))
        os.replace(tmp, self.images / f"{_hex(image.id)}.json")


def _hex(digest: str) -> str:
    algo, _, value = digest.partition(":")
    if algo != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
        raise UnsupportedImageError(f"unsupported digest {digest[:80]!r} (only sha256)")
    return value


def _sha256_file(path: Path) -> tuple[str, int]:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("a blob of the image is not a regular file")
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _verified(layout: Path, descriptor: dict[str, Any], what: str) -> Path:
    """The blob a descriptor names, after checking its sha256 and size against it."""
    digest = str(descriptor.get("digest", ""))
    path = layout / "blobs" / "sha256" / _hex(digest)
    if not path.exists():
        raise ImageError(f"{what} {digest} is missing from the copy")
    actual, size = _sha256_file(path)
    if actual != digest:
        raise DigestMismatchError(f"{what} {digest} does not match its content (sha256 {actual})")
    if "size" in descriptor and int(descriptor["size"]) != size:
        raise DigestMismatchError(
            f"{what} {digest}: size {size}, the manifest says {descriptor['size']}"
        )
    return path


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except ValueError:
        raise ImageError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    return data


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ImageError("the image config has a malformed list")


def _commit(store: _Store, layout: Path, references: Iterable[str]) -> Image:
    """Verify the staged image (manifest, config and every layer against their digests), check
    its platform, then move its new blobs into the store and write its record."""
    index = _read_json(layout / "index.json", "the copied index")
    manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    tagged = [m for m in manifests if m.get("annotations", {}).get(REF_ANNOTATION) == STAGING_TAG]
    if len(tagged) != 1:
        raise ImageError("the copy holds no single image")
    desc = tagged[0]
    if desc.get("mediaType") in (OCI_INDEX, DOCKER_LIST):
        raise UnsupportedImageError("an image index with no image for this platform")
    manifest_path = _verified(layout, desc, "manifest")
    manifest = _read_json(manifest_path, "the manifest")
    media = manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
    if media not in MANIFESTS:
        raise UnsupportedImageError(f"unsupported manifest type {str(media)[:100]!r}")
    config_desc = manifest.get("config") or {}
    config_path = _verified(layout, config_desc, "config")
    config = _read_json(config_path, "the image config")
    arch, os_name = str(config.get("architecture", "")), str(config.get("os", ""))
    if os_name != "linux" or arch != host_architecture():
        raise UnsupportedImageError(
            f"the image is for {os_name or '?'}/{arch or '?'}; "
            f"this node runs linux/{host_architecture()}"
        )
    layer_descs = [d for d in manifest.get("layers") or [] if isinstance(d, dict)]
    diff_ids = _strings((config.get("rootfs") or {}).get("diff_ids"))
    if len(diff_ids) != len(layer_descs):
        raise ImageError("the config's diff_ids do not match the manifest's layers")
    for d in diff_ids:
        _hex(d)
    size = int(desc.get("size", manifest_path.stat().st_size)) + config_path.stat().st_size
    blobs = [manifest_path, config_path]
    for i, d in enumerate(layer_descs):
        kind = str(d.get("mediaType", ""))
        if kind not in LAYER_TYPES:
            raise UnsupportedImageError(f"layer {i}: unsupported media type {kind[:100]!r}")
        path = _verified(layout, d, f"layer {i}")
        size += path.stat().st_size
        blobs.append(path)
    cfg = config.get("config") or {}
    labels = cfg.get("Labels") or {}
    image = Image(
        id=str(config_desc["digest"]),
        manifest_digest=str(desc["digest"]),
        references=tuple(dict.fromkeys(references)),
        size=size,
        created=config.get("created"),
        layers=tuple(str(d["digest"]) for d in layer_descs),
        diff_ids=diff_ids,
        layer_media_types=tuple(str(d["mediaType"]) for d in layer_descs),
        architecture=arch,
        os=os_name,
        env=_strings(cfg.get("Env")),
        working_dir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
        entrypoint=_strings(cfg.get("Entrypoint")),
        cmd=_strings(cfg.get("Cmd")),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
    )
    with store.locked():
        for path in blobs:
            target = store.blobs / path.name
            if not target.exists():
                os.rename(path, target)
        old = {i.id: i for i in store.records()}
        # A reference names one image: moving it leaves the previous image untagged, kept.
        for other in old.values():
            if other.id != image.id and set(other.references) & set(image.references):
                kept = tuple(r for r in other.references if r not in image.references)
                store.write_record(_replace_refs(other, kept))
        if image.id in old:
            merged = tuple(dict.fromkeys(old[image.id].references + image.references))
            image = _replace_refs(image, merged)
        store.write_record(image)
    return image


def _replace_refs(image: Image, references: tuple[str, ...]) -> Image:
    data = image.to_json()
    data["references"] = references
    return Image.from_json(data)


def pull(
    reference: str,
    store_dir: Path,
    *,
    insecure_registries: Iterable[str] = (),
    auth: RegistryAuth | None = None,
    max_bytes: int | None = None,
) -> Image:
    """Pull `reference` (`host[:port]/name[:tag|@digest]`) from its registry into the store.
    Plain HTTP (and unverified TLS) only for registries listed in `insecure_registries`
    (`host:port` as written in the reference). Layers already on the node are not fetched.
    With `max_bytes`, the image is described first and refused (ImageTooLargeError) if its
    compressed layers add up to more, or (UnsupportedImageError) if it is for another
    platform, before any layer is fetched; skopeo then checks each blob against its size."""
    skopeo.check_reference(reference)
    store = _Store(store_dir)
    registry = skopeo.registry_of(reference)
    tls_verify = not skopeo.is_insecure(registry, insecure_registries)
    with store.staging("pull") as layout:
        if max_bytes is not None:
            _check_size(
                reference, max_bytes, tmp_dir=store.tmp, tls_verify=tls_verify, auth=auth,
                registry=registry,
            )  # fmt: skip
        store.seed(layout)
        skopeo.copy(
            f"docker://{reference}", layout, STAGING_TAG, tmp_dir=store.tmp,
            tls_verify=tls_verify, auth=auth, registry=registry, what=reference,
        )  # fmt: skip
        return _commit(store, layout, [reference])


def _check_size(reference: str, max_bytes: int, **access: Any) -> None:
    """Refuse an image whose compressed layers add up to more than `max_bytes`, from its
    manifest (this platform's, in an image index), before any layer is fetched."""
    manifest = skopeo.inspect_raw(reference, **access)
    if manifest.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
        mine = [
            m for m in manifest.get("manifests") or []
            if isinstance(m, dict)
            and (m.get("platform") or {}).get("os") == "linux"
            and (m.get("platform") or {}).get("architecture") == host_architecture()
        ]  # fmt: skip
        if not mine:
            raise UnsupportedImageError(f"{reference} has no image for linux/{host_architecture()}")
        digest = str(mine[0].get("digest", ""))
        _hex(digest)
        manifest = skopeo.inspect_raw(f"{skopeo.repository_of(reference)}@{digest}", **access)
    layers = [d for d in manifest.get("layers") or [] if isinstance(d, dict)]
    total = sum(int(d.get("size") or 0) for d in layers)
    if total > max_bytes:
        raise ImageTooLargeError(
            f"{reference}: its layers are {total} bytes, over the limit of {max_bytes}"
        )


def import_archive(
    source: Path | IO[bytes], store_dir: Path, *, reference: str | None = None
) -> Image:
    """Import an OCI layout tarball or a `docker save` tarball holding one image. Its references
    are `reference` if given, else the archive's own (RepoTags, or the OCI ref annotation)."""
    store = _Store(store_dir)
    if reference is not None:
        skopeo.check_reference(reference)
    with store.staging("import") as work:
        if isinstance(source, Path):
            archive = source
        else:
            archive = work / "archive.tar"
            with archive.open("wb") as f:
                shutil.copyfileobj(source, f, CHUNK)
        kind, refs = _archive_kind(archive)
        layout = work / "layout"
        layout.mkdir()
        store.seed(layout)
        skopeo.copy(f"{kind}:{archive}", layout, STAGING_TAG, tmp_dir=store.tmp, what="the archive")
        return _commit(store, layout, [reference] if reference else refs)


def _archive_kind(archive: Path) -> tuple[str, list[str]]:
    try:
        with tarfile.open(archive, "r:") as tar:
            names = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            if "oci-layout" in names and "index.json" in names:
                index = json.load(tar.extractfile(names["index.json"]) or _empty())
                manifests = index.get("manifests") or []
                if len(manifests) != 1:
                    raise ImageArchiveError(
                        f"the archive holds {len(manifests)} images; import one at a time"
                    )
                ref = (manifests[0].get("annotations") or {}).get(REF_ANNOTATION)
                return "oci-archive", [ref] if ref and "/" in ref else []
            if "manifest.json" in names:
                items = json.load(tar.extractfile(names["manifest.json"]) or _empty())
                if not isinstance(items, list) or len(items) != 1:
                    raise ImageArchiveError("the archive must hold exactly one image")
                return "docker-archive", [str(t) for t in items[0].get("RepoTags") or []]
    except (tarfile.TarError, ValueError, AttributeError, EOFError):
        raise ImageArchiveError("not a readable tar archive of an image") from None
    raise ImageArchiveError("neither an OCI layout tarball nor a `docker save` tarball")


def _empty() -> IO[bytes]:
    import io

    return io.BytesIO(b"{}")


def clean_staging(store_dir: Path) -> int:
    """Remove what pulls, imports and unpacks left in `tmp/` when the node stopped mid-way;
    call it at the node's start, before any pull runs. Returns how many entries went."""
    store = _Store(store_dir)
    gone = 0
    for entry in store.tmp.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        gone += 1
    return gone


def list_images(store_dir: Path) -> list[Image]:
    return _Store(store_dir).records()


def get_image(store_dir: Path, name: str) -> Image:
    """The image whose id (`sha256:<hex>`, or a unique prefix of 12+ hex digits) or one of
    whose references is `name`."""
    images = _Store(store_dir).records()
    for image in images:
        if name in image.references or name == image.id:
            return image
    bare = name.removeprefix("sha256:")
    if len(bare) >= 12:
        found = [i for i in images if i.id.removeprefix("sha256:").startswith(bare)]
        if len(found) == 1:
            return found[0]
    raise ImageNotFoundError(f"no image {name[:100]!r} on this node")


def remove_image(store_dir: Path, name: str) -> Image:
    """Remove an image (by id or reference) and every blob and unpacked layer no other image
    uses. The caller makes sure no sandbox runs on its layers (their dirs are overlay lowers)."""
    store = _Store(store_dir)
    with store.locked():
        image = get_image(store_dir, name)
        (store.images / f"{_hex(image.id)}.json").unlink()
        rest = store.records()
        used = {_hex(d) for i in rest for d in (i.id, i.manifest_digest, *i.layers)}
        used_layers = {_hex(d) for i in rest for d in i.diff_ids}
        for d in (image.id, image.manifest_digest, *image.layers):
            if _hex(d) not in used:
                store.blob(d).unlink(missing_ok=True)
        for d in image.diff_ids:
            if _hex(d) not in used_layers:
                shutil.rmtree(store.layers / _hex(d), ignore_errors=True)
    return image


class _HashingReader:
    """Reads a stream and hashes what it reads (to check a layer's diff_id while unpacking)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        while self.read(CHUNK):
            pass
        return "sha256:" + self.hash.hexdigest()


def layer_dirs(store_dir: Path, image: Image, *, limits: UnpackLimits | None = None) -> list[Path]:
    """The image's layers as overlayfs lower dirs, top-most first (the order `lowerdir=` takes),
    unpacking those not yet on the node. Each unpacked layer's uncompressed content is checked
    against its diff_id. Shared by every image and sandbox that uses the layer."""
    limits = limits or UnpackLimits()
    store = _Store(store_dir)
    dirs: list[Path] = []
    total = 0
    for blob_digest, diff_id, media in zip(
        image.layers, image.diff_ids, image.layer_media_types, strict=True
    ):
        final = store.layers / _hex(diff_id)
        if not (final / "layer.json").exists():
            _unpack_into_cache(
                store, store.blob(blob_digest), diff_id, LAYER_TYPES.get(media, ""), limits,
                lowers=dirs[::-1],
            )  # fmt: skip
        stats = LayerStats.from_json(json.loads((final / "layer.json").read_text()))
        total += stats.bytes
        if total > limits.max_image_bytes:
            raise LayerLimitError(
                f"the image's content is over the limit of {limits.max_image_bytes} bytes"
            )
        dirs.append(final / "root")
    return dirs[::-1]


def _unpack_into_cache(
    store: _Store,
    blob: Path,
    diff_id: str,
    compression: str,
    limits: UnpackLimits,
    *,
    lowers: list[Path],
) -> None:
    if not blob.exists():
        raise ImageError(f"layer blob for {diff_id} is missing from the store")
    with store.staging("layer") as work:
        with blob.open("rb") as raw:
            plain: IO[bytes] = gzip.GzipFile(fileobj=raw) if compression == "gzip" else raw
            hashing = _HashingReader(plain)
            try:
                stats = unpack_layer(hashing, work / "root", limits=limits, lowers=lowers)  # type: ignore[arg-type]
                actual = hashing.drain()
            except (OSError, EOFError) as e:
                if isinstance(e, ImageError):
                    raise
                raise ImageError(f"layer {diff_id}: cannot be decompressed ({e})") from None
        if actual != diff_id:
            raise DigestMismatchError(f"layer {diff_id}: its content hashes to {actual}")
        (work / "layer.json").write_text(json.dumps(stats.to_json()))
        with contextlib.suppress(FileExistsError, OSError):
            # Another start unpacked the same layer meanwhile: theirs stays, ours goes.
            os.rename(work, store.layers / _hex(diff_id))


def overlay_lowerdir(dirs: list[Path]) -> str:
    """The `lowerdir=` value for dirs from layer_dirs (top-most first)."""
    for d in dirs:
        if any(c in str(d) for c in ":,\\"):
            raise ImageError("a layer path holds a character overlayfs options cannot carry")
    return ":".join(str(d) for d in dirs)
