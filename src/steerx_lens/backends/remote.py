"""Running steerx_lens remotely on NDIF through nnsight, with clear errors when it cannot.

Every library call on an nnsight model whose adapter has ``remote`` set (``True`` for NDIF, a
host URL, or ``"local"`` for nnsight's offline simulation of the remote path) runs as one
remote request per batch: the traced block and the interventions (vectors, patch sources) are
serialized, executed next to the model, and only what the library saves comes back (token
scores, requested activations, generated ids, never whole logits unless asked for).

What can go wrong is turned into a :class:`RemoteError` that says what failed and what to do:

- :class:`RemoteConfigError` — no API key, or the key was rejected;
- :class:`RemoteModelError` — a model id that cannot be resolved, or a model loaded from a
  local folder (NDIF runs models by their hub id);
- :class:`RemoteExecutionError` — NDIF unreachable (network), or the job failed on the server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Union

from steerx_lens.errors import SteerXError

RemoteMode = Union[bool, Literal["local"], str]
KEY_HELP = (
    "set the NDIF_API_KEY environment variable or call nnsight.CONFIG.set_default_api_key(KEY) "
    "(get a key at https://login.ndif.us), or pass remote='local' to run the same code offline"
)


class RemoteError(SteerXError, RuntimeError):
    """Base class of the errors of remote (NDIF) execution."""


class RemoteConfigError(RemoteError):
    """Remote execution is not configured: no API key, a rejected key, or a bad ``remote``."""


class RemoteModelError(RemoteError):
    """The model cannot run remotely: unknown id, not hosted, or loaded from a local folder."""


class RemoteExecutionError(RemoteError):
    """NDIF could not be reached, or the remote job failed on the server."""


def check_mode(remote: Any) -> RemoteMode:
    """Validate a ``remote`` argument: ``False``, ``True``, ``"local"`` or an http(s) host URL."""
    if remote is False or remote is None:
        return False
    if remote is True or remote == "local":
        return remote
    if isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return remote
    raise RemoteConfigError(
        f"remote must be False, True (NDIF), 'local' (offline simulation) or an http(s) host "
        f"URL, got {remote!r}"
    )


def is_network(remote: RemoteMode) -> bool:
    """Whether ``remote`` sends requests over the network (anything but False and "local")."""
    return bool(remote) and remote != "local"


def api_key() -> str | None:
    """The NDIF API key nnsight will send: ``NDIF_API_KEY`` or ``nnsight.CONFIG.API.APIKEY``."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def host(remote: RemoteMode) -> str:
    """The host a remote request goes to."""
    from nnsight import CONFIG

    return remote if isinstance(remote, str) and remote != "local" else str(CONFIG.API.HOST)


def require_api_key() -> None:
    """Raise :class:`RemoteConfigError` when no API key is configured."""
    if not api_key():
        raise RemoteConfigError(f"remote=True needs an NDIF API key and none is set: {KEY_HELP}")


def model_key(model: Any) -> str:
    """nnsight's key naming ``model`` on the server; :class:`RemoteModelError` if it has none."""
    source = str(getattr(model, "repo_id", "") or "")
    if source and Path(source).exists():
        raise RemoteModelError(
            f"the model was loaded from the local folder {source!r}; NDIF runs models by their "
            "hub id: load it with steerx_lens.backends.remote.load_remote_model('org/name'), or use "
            "remote='local' to run this model through the remote code path offline"
        )
    try:
        return str(model.to_model_key())
    except Exception as error:  # nnsight raises hub validation errors of several kinds
        raise RemoteModelError(
            f"nnsight cannot name this model for NDIF ({type(error).__name__}: {error}); load "
            "it by its hub id with steerx_lens.backends.remote.load_remote_model"
        ) from error


def register_library() -> None:
    """Ship steerx_lens's own code by value with remote requests (the server lacks it)."""
    import nnsight

    import steerx_lens

    nnsight.register(steerx_lens)


def prepare(model: Any, remote: RemoteMode) -> RemoteMode:
    """Check that ``model`` can run with ``remote`` before any request is made."""
    remote = check_mode(remote)
    if remote:
        register_library()
    if is_network(remote):
        require_api_key()
        model_key(model)
    return remote


@contextmanager
def translated_errors(remote: RemoteMode, what: str) -> Iterator[None]:
    """Turn failures of a remote request for ``what`` into :class:`RemoteError` subclasses."""
    if not is_network(remote):
        yield
        return
    try:
        yield
    except RemoteError:
        raise
    except Exception as error:
        translated = translate(error, remote, what)
        if translated is None:
            raise
        raise translated from error


def translate(error: BaseException, remote: RemoteMode, what: str) -> RemoteError | None:
    """The :class:`RemoteError` for a failure of a remote request, or None if not remote's."""
    from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError

    where = host(remote)
    status = _http_status(error)
    if status in (401, 403):
        return RemoteConfigError(
            f"NDIF at {where} rejected the API key (HTTP {status}) while running {what}: {KEY_HELP}"
        )
    if status is not None:
        return RemoteExecutionError(
            f"NDIF at {where} answered HTTP {status} while running {what}: {error}. Check the "
            "model is hosted (nnsight.ndif.status()) and retry later"
        )
    if isinstance(error, NNsightRemoteError):
        if "Failed to send request" in str(error):
            return RemoteExecutionError(
                f"could not send the request for {what} to NDIF at {where}: {error}. Check the "
                "network and NDIF's status (nnsight.ndif.status())"
            )
        return RemoteExecutionError(
            f"the NDIF job for {what} failed on the server: {error}. Nothing was written; "
            "run the same call with remote='local' to debug it offline"
        )
    if isinstance(error, (OSError, TimeoutError)) or _is_network_error(error):
        return RemoteExecutionError(
            f"could not reach NDIF at {where} while running {what} ({type(error).__name__}: "
            f"{error}). Check the network and the host (nnsight.CONFIG.API.HOST / NDIF_HOST)"
        )
    return None


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of an httpx or websocket error (also when it is an error's cause)."""
    for candidate in (error, error.__cause__):
        if candidate is None:
            continue
        code = getattr(candidate, "status_code", None)
        response = getattr(candidate, "response", None)
        if code is None and response is not None:
            code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _is_network_error(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) is an httpx or websocket transport error."""
    names = {cls.__module__.split(".")[0] for cls in type(error).__mro__}
    cause = error.__cause__
    if cause is not None:
        names |= {cls.__module__.split(".")[0] for cls in type(cause).__mro__}
    return bool(names & {"httpx", "httpcore", "websocket"})


def load_remote_model(model_id: str, remote: RemoteMode = True, **kwargs: Any) -> Any:
    """An nnsight model for ``model_id`` whose steerx_lens calls run remotely.

    The weights are not downloaded (nnsight builds the model on the meta device; with
    ``remote="local"`` they are loaded on the first call, so ``model_id`` may be a local folder).
    ``kwargs`` go to ``nnsight.modeling.transformers.TransformersModel``.
    """
    remote = check_mode(remote)
    if is_network(remote):
        require_api_key()
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    try:
        tokenizer = kwargs.pop("tokenizer", None) or AutoTokenizer.from_pretrained(model_id)
        model = TransformersModel(model_id, task="text-generation", tokenizer=tokenizer, **kwargs)
    except (OSError, ValueError) as error:
        raise RemoteModelError(
            f"could not resolve the model {model_id!r} ({type(error).__name__}: {error}). Use "
            "a Hugging Face repo id hosted on NDIF (see nnsight.ndif.status()); its config and "
            "tokenizer are read from the hub (or the local HF cache)"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from steerx_lens.backends import get_adapter

    get_adapter(model, tokenizer, remote=remote)
    return model
