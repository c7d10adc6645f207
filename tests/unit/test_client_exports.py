"""The public surface of the `corral` package, and the parity of its two clients."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import corral
from corral import AsyncClient, Client

# Methods whose sync and async forms legitimately differ in name.
CONTEXT_MANAGER = {"__enter__", "__exit__", "__aenter__", "__aexit__"}


def public_methods(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member)
    }


def test_every_exported_name_exists() -> None:
    missing = [name for name in corral.__all__ if not hasattr(corral, name)]
    assert missing == []
    assert len(set(corral.__all__)) == len(corral.__all__)


def test_version() -> None:
    assert corral.__version__ == "0.1.0"


def test_exported_objects_claim_a_public_module() -> None:
    # Everything comes from a `corral` module, re-exported rather than defined here.
    for name in corral.__all__:
        value = getattr(corral, name)
        module = getattr(value, "__module__", None)
        if module is not None:
            assert module.startswith("corral."), (name, module)


def test_clients_have_the_same_methods() -> None:
    assert set(public_methods(Client)) == set(public_methods(AsyncClient))


@pytest.mark.parametrize("name", sorted(public_methods(Client)))
def test_clients_have_the_same_signatures(name: str) -> None:
    sync_method = getattr(Client, name)
    async_method = getattr(AsyncClient, name)
    assert inspect.signature(sync_method) == inspect.signature(async_method)
    assert not inspect.iscoroutinefunction(sync_method)
    assert inspect.iscoroutinefunction(async_method)


def test_constructors_take_the_same_parameters() -> None:
    sync_params = inspect.signature(Client.__init__).parameters
    async_params = inspect.signature(AsyncClient.__init__).parameters
    assert list(sync_params) == list(async_params)
    for name, param in sync_params.items():
        other = async_params[name]
        assert (param.kind, param.default) == (other.kind, other.default), name


def test_context_managers() -> None:
    assert {"__enter__", "__exit__"} <= set(dir(Client))
    assert {"__aenter__", "__aexit__"} <= set(dir(AsyncClient))


def test_exceptions_share_one_root_and_fit_builtins() -> None:
    assert issubclass(corral.TransportError, ConnectionError)
    assert issubclass(corral.ConnectTimeout, TimeoutError)
    assert issubclass(corral.ReadTimeout, TimeoutError)
    assert issubclass(corral.NotFoundError, LookupError)
    assert issubclass(corral.PermissionDeniedError, PermissionError)
    assert issubclass(corral.ValidationError, ValueError)
    assert issubclass(corral.BadRequestError, ValueError)
    assert issubclass(corral.UnavailableError, corral.APIError)
    for name in corral.__all__:
        value = getattr(corral, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, corral.CorralError), name


def test_import_loads_no_server_code() -> None:
    code = (
        "import sys, corral; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette', 'sqlalchemy', 'uvicorn', 'alembic')"
        " or m.startswith(('corral.api', 'corral.store', 'corral.runtime', 'corral.node'))]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
