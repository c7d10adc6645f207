"""Tiny container images built by hand for tests: OCI layouts (dir or tarball) and `docker save`
tarballs, from layers given as {path: bytes} and a few config fields, and pushing to a test
registry with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from corral.runtime.images import host_architecture

MTIME = 1_700_000_000


def layer_tar(files: dict[str, bytes | None]) -> bytes:
    """An uncompressed layer: `None` makes a directory; names starting `.wh.` are whiteouts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755 if name.startswith("bin/") else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class BuiltImage:
    layers: list[bytes]  # uncompressed tars
    config: dict[str, object] = field(default_factory=dict)
    architecture: str = field(default_factory=host_architecture)
    wrong_diff_ids: bool = False  # a config whose diff_ids do not hash the layers

    def __post_init__(self) -> None:
        # gzip with a fixed mtime: the same layer gives the same blob in every image.
        self.blobs = [gzip.compress(t, mtime=0) for t in self.layers]
        self.layer_digests = [sha256(b) for b in self.blobs]
        self.diff_ids = [sha256(t + b"x" if self.wrong_diff_ids else t) for t in self.layers]
        self.config_bytes = json.dumps({
            "architecture": self.architecture, "os": "linux",
            "created": "2026-01-02T03:04:05Z",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
        }).encode()  # fmt: skip
        self.config_digest = sha256(self.config_bytes)
        self.manifest_bytes = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.config_digest, "size": len(self.config_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": d, "size": len(b)}
                       for d, b in zip(self.layer_digests, self.blobs, strict=True)],
        }).encode()  # fmt: skip
        self.manifest_digest = sha256(self.manifest_bytes)

    def oci_layout(self, path: Path, ref: str = "latest") -> Path:
        blobs = path / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for data in [*self.blobs, self.config_bytes, self.manifest_bytes]:
            (blobs / sha256(data).removeprefix("sha256:")).write_bytes(data)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (path / "index.json").write_text(json.dumps({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": self.manifest_digest, "size": len(self.manifest_bytes),
                           "annotations": {"org.opencontainers.image.ref.name": ref}}],
        }))  # fmt: skip
        return path

    def oci_archive(self, path: Path, ref: str = "latest") -> Path:
        layout = self.oci_layout(path.with_suffix(".layout"), ref)
        with tarfile.open(path, "w") as tar:
            for item in sorted(layout.rglob("*")):
                tar.add(item, arcname=str(item.relative_to(layout)), recursive=False)
        return path

    def docker_archive(self, path: Path, tag: str) -> Path:
        """What `docker save` writes: uncompressed layers, the config, manifest.json."""
        with tarfile.open(path, "w") as tar:

            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), MTIME
                tar.addfile(info, io.BytesIO(data))

            config_name = self.config_digest.removeprefix("sha256:") + ".json"
            add(config_name, self.config_bytes)
            names = []
            for diff_id, data in zip(self.diff_ids, self.layers, strict=True):
                names.append(f"{diff_id.removeprefix('sha256:')}/layer.tar")
                add(names[-1], data)
            manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": names}]
            add("manifest.json", json.dumps(manifest).encode())
        return path

    def push(self, layout_dir: Path, dest: str, creds: str | None = None) -> None:
        """Push to a plain-HTTP test registry (`host:port/name:tag`)."""
        layout = self.oci_layout(layout_dir)
        argv = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false"]
        if creds:
            argv += ["--dest-creds", creds]
        subprocess.run(
            [*argv, f"oci:{layout}:latest", f"docker://{dest}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip


def push_index(images: list[BuiltImage], layout_dir: Path, dest: str) -> None:
    """Push several images as one multi-platform image index (`skopeo copy --all`)."""
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    entries = []
    for image in images:
        for data in [*image.blobs, image.config_bytes, image.manifest_bytes]:
            (blobs / sha256(data).removeprefix("sha256:")).write_bytes(data)
        entries.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest_digest, "size": len(image.manifest_bytes),
            "platform": {"architecture": image.architecture, "os": "linux"},
        })  # fmt: skip
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()  # fmt: skip
    (blobs / sha256(index).removeprefix("sha256:")).write_bytes(index)
    (layout_dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout_dir / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                       "digest": sha256(index), "size": len(index),
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    }))  # fmt: skip
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--all", "--dest-tls-verify=false",
         f"oci:{layout_dir}:latest", f"docker://{dest}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
