"""The image store's errors across the node protocol and as API statuses, and the small parts of
the images API that need no server."""

from __future__ import annotations

import pydantic
import pytest

from corral.core.images import env_pairs, image_problem, looks_like_id
from corral.core.models import RegistryCredentials, SandboxCreate
from corral.node import protocol as p
from corral.node.bus import RemoteError
from corral.node.images import ImageInUse
from corral.runtime.images import errors as e
from corral.settings import Settings

STATUSES = [
    (e.ImageNotFoundError, True, 404, "not_found"),
    (e.RegistryAuthError, True, 403, "registry_unauthorized"),
    (e.RegistryError, True, 502, "registry_error"),
    (e.DigestMismatchError, True, 502, "digest_mismatch"),
    (e.DigestMismatchError, False, 422, "digest_mismatch"),
    (e.UnsupportedImageError, False, 422, "unsupported_image"),
    (e.ImageArchiveError, False, 422, "bad_archive"),
    (e.ImageTooLargeError, True, 413, "image_too_large"),
    (e.LayerLimitError, False, 413, "image_too_large"),
    (e.ImageStoreFullError, True, 507, "insufficient_storage"),
    (e.HostileLayerError, False, 422, "hostile_layer"),
    (e.LayerError, False, 422, "bad_layer"),
    (e.ImageError, True, 422, "invalid_argument"),
]


@pytest.mark.parametrize(("cls", "from_registry", "status", "code"), STATUSES)
def test_each_store_error_has_its_status(
    cls: type[Exception], from_registry: bool, status: int, code: str
) -> None:
    problem = image_problem(cls("why it failed"), from_registry=from_registry)
    assert (problem.status, problem.code, problem.message) == (status, code, "why it failed")


@pytest.mark.parametrize("cls", sorted({c for c, *_ in STATUSES} | {ImageInUse}, key=str))
def test_each_store_error_crosses_the_node_protocol_as_itself(cls: type[Exception]) -> None:
    name = p.error_name(cls("a message"))
    assert name is not None
    with pytest.raises(cls) as raised:
        p.raise_remote(RemoteError(name, "a message"))
    assert type(raised.value) is cls and str(raised.value) == "a message"


def test_ids_and_references() -> None:
    assert looks_like_id("sha256:" + "a" * 64) and looks_like_id("0123456789ab")
    assert not looks_like_id("127.0.0.1:5000/team/tool:1") and not looks_like_id("alpine")
    assert not looks_like_id("0123456789a")  # too short for a prefix: a name


def test_an_images_env_as_a_mapping() -> None:
    got = env_pairs(["PATH=/a:/b", "EMPTY=", "BARE", "EQ=a=b", "9BAD=x", "bad-name=y", "N=\0"])
    assert got == {"PATH": "/a:/b", "EMPTY": "", "BARE": "", "EQ": "a=b"}


def test_registry_credentials() -> None:
    assert RegistryCredentials(username="u", password="p").password == "p"
    assert RegistryCredentials(token="t").token == "t"
    for bad in ({}, {"username": "u"}, {"password": "p"}, {"username": "u", "token": "t"}):
        with pytest.raises(pydantic.ValidationError):
            RegistryCredentials.model_validate(bad)
    assert "s3cret" not in repr(RegistryCredentials(username="u", password="s3cret"))


def test_image_and_template_exclude_each_other() -> None:
    assert SandboxCreate(image="reg.example/x:1").template == "host"
    with pytest.raises(pydantic.ValidationError, match="image or a template"):
        SandboxCreate(image="reg.example/x:1", template="python")
    with pytest.raises(pydantic.ValidationError):
        SandboxCreate(image="Not A Reference")


def test_insecure_registries_setting() -> None:
    settings = Settings(insecure_registries=" 127.0.0.1:5000, reg.example ,[::1]:5000,")
    assert settings.insecure_registry_list == ("127.0.0.1:5000", "reg.example", "[::1]:5000")
    assert Settings().insecure_registry_list == ()
    for bad in ("http://reg.example:5000", "reg.example:5000/path", "a b"):
        with pytest.raises(pydantic.ValidationError, match="host"):
            Settings(insecure_registries=bad)
    assert settings.images_dir == settings.data_dir / "images"
