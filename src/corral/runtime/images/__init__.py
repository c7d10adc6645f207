"""The node's OCI image store: pull from registries, import archives, verify, cache layers once,
and unpack them safely as overlayfs lower dirs.

Interface (all blocking: call them from a thread, not the event loop)::

    pull(reference, store_dir, *, insecure_registries=(), auth=None, max_bytes=None) -> Image
    import_archive(path_or_stream, store_dir, *, reference=None) -> Image
    list_images(store_dir) -> list[Image]
    get_image(store_dir, id_or_reference) -> Image
    remove_image(store_dir, id_or_reference) -> Image
    layer_dirs(store_dir, image, *, limits=None) -> list[Path]   # top-most first
    overlay_lowerdir(dirs) -> str                                  # "L3:L2:L1"
    clean_staging(store_dir) -> int                               # at node start
    unpack_layer(source, dest, *, limits=None, lowers=()) -> LayerStats   # the safe unpacker

Registry access and archive reading are skopeo's (`skopeo copy docker://REF oci:DIR:TAG`,
`docker-archive:`, `oci-archive:`), into a staging OCI layout under the store; blobs the node
already has are hard-linked into it first, so skopeo skips them and a layer shared by two images
is fetched and stored once. After the copy every blob (manifest, config, layers) is hashed here
against its digest and size, and the config's platform must be this node's (linux and the host
architecture): only then are the new blobs moved into `blobs/sha256/` and the record written.
Any failure removes the staging layout: nothing half-made remains. Credentials
(`RegistryAuth`) go to skopeo in a 0600 auth file removed after the copy, never on argv.
`insecure_registries` lists `host:port` names (as in `CORRAL_INSECURE_REGISTRIES`) reached over
plain HTTP or unverified TLS.

An `Image` is identified by its config digest (`id`); `references` are the names it was pulled
or imported under (a name moved to a newer image leaves the older one untagged). Its config
fields (`env`, `working_dir`, `user`, `entrypoint`, `cmd`) are the image's, unmodified.

The writable root: `layer_dirs` returns the image's layers unpacked once per node, each in
overlayfs lower-dir format (OCI whiteouts are overlay whiteouts: a 0/0 character device;
opaque directories carry `trusted.overlay.opaque=y`), content-checked against the config's
diff_ids. Mount a sandbox's root with

    mount -t overlay overlay \\
        -o lowerdir=<overlay_lowerdir(dirs)>,upperdir=U,workdir=W TARGET

with U and W on the same file system, per sandbox (its disk). Layer files keep the image's own
uids/gids (applied with lchown as root), so they serve every sandbox; the sandbox's user
namespace or an idmapped mount of the lowers must map them (`LayerStats.max_uid/max_gid`, in
`layers/<hex>/layer.json`, say how far). Layer dirs must not be removed while mounted: refuse
`remove_image` for an image a sandbox runs on. The kernel's limit on mount options (one page)
bounds `lowerdir=` to some 40 layers at the store's path lengths; deeper images need the new
mount API's `lowerdir+` or shorter paths (symlinks in a short dir).

The unpacker (`unpack.py`) refuses, with a HostileLayerError or LayerLimitError and nothing
left behind: `..` and absolute names, writing through a symlinked parent, hard links out of
the layer, through a symlink or to a directory, names over NAME_MAX/PATH_MAX, entries, layer
and image bytes over `UnpackLimits`, header blocks over 1 MiB. Devices, FIFOs and tar xattrs are
skipped and counted; setuid/setgid bits are kept (why: in `unpack.py`).

Errors are in `corral.runtime.images.errors` (ImageError and its tree); messages never carry
the node's paths or credentials. `registry` tests: tests/integration/test_image_registry.py.
"""

from corral.runtime.images.errors import (
    DigestMismatchError,
    HostileLayerError,
    ImageArchiveError,
    ImageError,
    ImageNotFoundError,
    ImageStoreFullError,
    ImageTooLargeError,
    LayerError,
    LayerLimitError,
    RegistryAuthError,
    RegistryError,
    UnsupportedImageError,
)
from corral.runtime.images.skopeo import RegistryAuth
from corral.runtime.images.store import (
    Image,
    clean_staging,
    get_image,
    host_architecture,
    import_archive,
    layer_dirs,
    list_images,
    overlay_lowerdir,
    pull,
    remove_image,
)
from corral.runtime.images.unpack import LayerStats, UnpackLimits, unpack_layer

__all__ = [
    "DigestMismatchError",
    "HostileLayerError",
    "Image",
    "ImageArchiveError",
    "ImageError",
    "ImageNotFoundError",
    "ImageStoreFullError",
    "ImageTooLargeError",
    "LayerError",
    "LayerLimitError",
    "LayerStats",
    "RegistryAuth",
    "RegistryAuthError",
    "RegistryError",
    "UnpackLimits",
    "UnsupportedImageError",
    "clean_staging",
    "get_image",
    "host_architecture",
    "import_archive",
    "layer_dirs",
    "list_images",
    "overlay_lowerdir",
    "pull",
    "remove_image",
    "unpack_layer",
]
