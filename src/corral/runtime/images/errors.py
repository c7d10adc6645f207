"""The image store's exceptions.

    ImageError                   every failure of the store; `str()` is safe to show a caller
    ├── ImageNotFoundError       no such image in the registry, the archive or the store
    ├── RegistryError            the registry refused or failed (network, TLS, HTTP status)
    │   └── RegistryAuthError    the registry refused the credentials (or wanted some)
    ├── DigestMismatchError      a blob's content does not hash to its digest
    ├── UnsupportedImageError    another architecture or OS, an unknown media type, zstd layers
    ├── ImageArchiveError        an archive that is neither an OCI layout nor a `docker save` tar
    ├── ImageTooLargeError       an image whose layers are over the pull size limit
    ├── ImageStoreFullError      the node's disk filled up while pulling or unpacking
    └── LayerError               a layer that cannot be unpacked
        ├── HostileLayerError    an entry that would write outside the root or through a symlink
        └── LayerLimitError      a layer or image over its size limit, or with too many entries

Messages name image digests and paths inside an image, never a path of the node's host.
"""

from __future__ import annotations


class ImageError(Exception):
    """A failure of the image store; the message is meant for the caller."""


class ImageNotFoundError(ImageError, LookupError):
    """The image does not exist (in the registry, the archive or the node's store)."""


class RegistryError(ImageError):
    """The registry could not be reached, refused the request or answered an error."""


class RegistryAuthError(RegistryError, PermissionError):
    """The registry refused the credentials given, or asked for credentials none were given."""


class DigestMismatchError(ImageError):
    """A blob's sha256 is not the digest that names it."""


class UnsupportedImageError(ImageError):
    """The image is for another platform, or uses a format this store does not read."""


class ImageArchiveError(ImageError):
    """The archive is not an OCI layout tarball nor a `docker save` tarball."""


class ImageTooLargeError(ImageError):
    """The image's layers add up to more than the node accepts to fetch."""


class ImageStoreFullError(ImageError, OSError):
    """The node's image store ran out of space (or quota)."""


class LayerError(ImageError):
    """A layer could not be unpacked."""


class HostileLayerError(LayerError):
    """A layer entry tries to write outside the layer's root (through `..`, an absolute name,
    a symlinked parent or a hard link out)."""


class LayerLimitError(LayerError):
    """A layer (or a whole image) is over a size limit, or has too many entries."""
