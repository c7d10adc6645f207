"""A real Debian image for tests: a minimal bookworm root made with `mmdebstrap` from Debian's
packages (apt, passwd and login, so that `apt-get install`, `useradd -m` and `su` work), packed
as a one-layer OCI layout and cached between runs outside the repository.

    image = debian_image()                        # builds once (a few minutes), then cached
    image.push("127.0.0.1:5000/debian:bookworm")  # to a test registry (tests.engines.Registry)

The cache (`CORRAL_TEST_CACHE`, default /var/cache/corral-tests) keeps one layout per build
recipe, named by a hash of the recipe: change the recipe and a new image is built; remove the
directory to rebuild. A build runs under a lock, in a temporary directory renamed into place
when complete, so two test processes never build twice or see half an image.

mmdebstrap runs as root (its `root` mode), so the layer keeps Debian's owners (files of uid 0,
apt's `partial` dirs of `_apt`, uid 42). The layer has no device nodes (the runtime gives a
sandbox its /dev) and no copy of the build host's resolv.conf or hostname. Packages' docs, man
pages and translations are left out (dpkg path excludes, kept in the image, as Debian's slim
images do): 121 MB of tar instead of 164 MB. The package lists are not kept: `apt-get
install ./x.deb` works offline for a package whose dependencies are installed, and `apt-get
update` reads the mirror of the build (its sources.list).

Ids a sandbox's user namespace must map for apt and useradd to work in it: apt drops to
`_apt` (uid 42) and `nogroup` (gid 65534) for downloads, even of a local .deb; /etc/shadow is
group `shadow` (gid 42); useradd gives new users uids and gids from 1000. With uid 0 mapped
alone, `apt-get install` fails on seteuid(42) and useradd cannot write /etc/shadow.

`python -m tests.debian_image` builds (or finds) the image and prints its size and build time.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corral.runtime.images import host_architecture

CACHE_ENV = "CORRAL_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/corral-tests")
# Part of every recipe: bump it when the packing below changes what ends up in the layout.
FORMAT = 1
# Fixed file times and `created` (mmdebstrap clamps mtimes to it): the same recipe and mirror
# content give the same layer.
SOURCE_DATE_EPOCH = 1_700_000_000
CHUNK = 1 << 20
BUILD_TIMEOUT = 900  # seconds; a cold build took 50 to 150 s here, on a busy machine

IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's own
SLIM_PATHS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
)


class DebianImageError(RuntimeError):
    """The image could not be built (no mmdebstrap, not root, the mirror unreachable...)."""


def host_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb.debian.org when none is configured)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            # deb822 ("URIs: http://...") and one-line ("deb [opts] http://... suite") sources
            uris = words[1:] if words[:1] in (["URIs:"], ["deb"]) else []
            for uri in uris:
                if uri.rstrip("/").endswith("/debian") and uri.startswith(("http://", "https://")):
                    return uri.rstrip("/")
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class DebianRecipe:
    """What goes into the image; its hash names the cache entry."""

    suite: str = "bookworm"
    variant: str = "apt"  # the Essential: yes packages and apt
    include: tuple[str, ...] = ("passwd", "login")  # useradd/groupadd; su's PAM setup and login
    mirror: str = field(default_factory=host_mirror)
    architecture: str = field(default_factory=host_architecture)
    format: int = FORMAT

    @property
    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"debian-{self.suite}-{hashlib.sha256(blob).hexdigest()[:16]}"

    def sources(self) -> list[str]:
        """sources.list lines: the suite, its updates and its security archive."""
        security = self.mirror.removesuffix("/debian") + "/debian-security"
        return [
            f"deb {self.mirror} {self.suite} main",
            f"deb {self.mirror} {self.suite}-updates main",
            f"deb {security} {self.suite}-security main",
        ]


@dataclass(frozen=True)
class DebianImage:
    """A built image: an OCI layout in the cache (tag `tag`) and what it holds."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digest: str  # the gzip blob
    diff_id: str  # the uncompressed tar
    layer_bytes: int  # compressed
    tar_bytes: int  # uncompressed
    build_seconds: float  # of the build that made it (not of this run)
    recipe: dict[str, object]

    def push(self, dest: str, *, creds: str | None = None, timeout: float = 120) -> str:
        """Copy to a plain-HTTP test registry as `dest` (`host:port/name:tag`); returns dest."""
        argv = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "--quiet"]
        if creds:
            argv += ["--dest-creds", creds]
        subprocess.run(
            [*argv, f"oci:{self.layout}:{self.tag}", f"docker://{dest}"],
            check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        return dest

    def oci_archive(self, path: Path) -> Path:
        """The layout as one OCI archive tarball (to import rather than pull)."""
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--quiet",
             f"oci:{self.layout}:{self.tag}", f"oci-archive:{path}:{self.tag}"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def debian_image(recipe: DebianRecipe | None = None, *, cache: Path | None = None) -> DebianImage:
    """The recipe's image from the cache, built first if it is not there."""
    recipe = recipe or DebianRecipe()
    root = (cache or cache_dir()) / "images"
    final = root / recipe.key
    found = _load(final)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        found = _load(final)  # another process built it while we waited
        if found is not None:
            return found
        # Left by a build that was killed, or an entry someone emptied by hand.
        for stale in [*root.glob(f".build-{recipe.key}-*"), final]:
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{recipe.key}-", dir=root))
        # mmdebstrap's chroot is made below: apt's _apt user must reach it, or apt runs
        # unsandboxed and its partial/ dirs end up owned by root instead of _apt.
        work.chmod(0o755)
        try:
            _build(recipe, work)
            os.rename(work / "layout", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    image = _load(final)
    if image is None:
        raise DebianImageError(f"the build left no image at {final}")
    return image


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(layout: Path) -> DebianImage | None:
    try:
        data = json.loads((layout / "corral-image.json").read_text())
    except (OSError, ValueError):
        return None
    return DebianImage(layout=layout, **data)


def _build(recipe: DebianRecipe, work: Path) -> None:
    if os.geteuid() != 0:
        raise DebianImageError("building the Debian test image needs root (mmdebstrap --mode=root)")
    for tool in ("mmdebstrap", "mmtarfilter"):
        if shutil.which(tool) is None:
            raise DebianImageError(f"{tool} is not installed (scripts/setup.sh installs it)")
    started = time.monotonic()
    raw, tar = work / "mmdebstrap.tar", work / "layer.tar"
    argv = [
        "mmdebstrap", "--mode=root", "--format=tar", f"--variant={recipe.variant}",
        f"--architectures={recipe.architecture}",
        # Mirrors serving a fixed snapshot carry Release files past their Valid-Until.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        *(f"--dpkgopt={p}" for p in SLIM_PATHS),
        '--customize-hook=rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
    ]  # fmt: skip
    if recipe.include:
        argv.append("--include=" + ",".join(recipe.include))
    argv += [recipe.suite, str(raw), *recipe.sources()]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "TMPDIR": str(work)}
    try:
        subprocess.run(
            argv, check=True, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT
        )
    except subprocess.CalledProcessError as e:
        raise DebianImageError(f"mmdebstrap failed:\n{e.stderr[-4000:]}") from None
    # The runtime gives a sandbox its own /dev: an image carries none (as OCI images do).
    with raw.open("rb") as src, tar.open("wb") as dst:
        subprocess.run(["mmtarfilter", "--path-exclude=/dev/*"], stdin=src, stdout=dst, check=True)
    raw.unlink()
    _write_layout(recipe, tar, work / "layout", time.monotonic() - started)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_layout(recipe: DebianRecipe, tar: Path, layout: Path, seconds: float) -> None:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    plain, packed = hashlib.sha256(), hashlib.sha256()
    staging = blobs / "layer.partial"
    with tar.open("rb") as src, staging.open("wb") as out:
        # No name and no time in the gzip header: the same tar gives the same blob.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as gz:
            while chunk := src.read(CHUNK):
                plain.update(chunk)
                gz.write(chunk)
    with staging.open("rb") as f:
        while chunk := f.read(CHUNK):
            packed.update(chunk)
    layer_digest, diff_id = "sha256:" + packed.hexdigest(), "sha256:" + plain.hexdigest()
    layer_bytes, tar_bytes = staging.stat().st_size, tar.stat().st_size
    staging.rename(blobs / layer_digest.removeprefix("sha256:"))

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(SOURCE_DATE_EPOCH))
    config = json.dumps({
        "architecture": recipe.architecture, "os": "linux", "created": created,
        "config": {"Env": [f"PATH={IMAGE_PATH}"], "Cmd": ["/bin/bash"],
                   "Labels": {"org.corral.test.recipe": recipe.key}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": f"mmdebstrap {recipe.variant} "
                     f"{recipe.suite} +{','.join(recipe.include)}"}],
    }, sort_keys=True).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_bytes}],
    }, sort_keys=True).encode()  # fmt: skip
    for data in (config, manifest):
        (blobs / _sha256(data).removeprefix("sha256:")).write_bytes(data)
    tag = recipe.suite
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": _sha256(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))  # fmt: skip
    # Written last: its presence marks a complete layout (see _load).
    (layout / "corral-image.json").write_text(json.dumps({
        "tag": tag, "manifest_digest": _sha256(manifest), "config_digest": _sha256(config),
        "layer_digest": layer_digest, "diff_id": diff_id, "layer_bytes": layer_bytes,
        "tar_bytes": tar_bytes, "build_seconds": round(seconds, 1), "recipe": asdict(recipe),
    }, indent=2))  # fmt: skip


def main() -> None:
    started = time.monotonic()
    image = debian_image()
    took = time.monotonic() - started
    print(f"{image.layout} ({image.tag}): layer {image.layer_bytes / 1e6:.1f} MB gzip, "
          f"{image.tar_bytes / 1e6:.1f} MB tar; built in {image.build_seconds} s; "
          f"this run {took:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
