"""``mipseg_annotate`` as Python functions: open a dataset for drawing, serve the page until Ctrl-C.

Reads ``raw/{dataset}`` (images, dataset.json, annotationsTr), label sets under
``preprocessed/{dataset}/labelsets``, ``suggested_slices.json`` and, when one exists, a trained
model under ``results/{dataset}``. Writes only ``annotationsTr/{case}_mip{a}.png`` /
``{case}_slice{k}.png``, ``annotationsTr/.history/`` and the model cache
``preprocessed/{dataset}/annotate/``.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Callable, Sequence

from mipseg.annotate.model_prefill import ModelPrefill
from mipseg.annotate.server import AnnotateSession, create_app
from mipseg.annotate.store import AnnotationStore
from mipseg.annotate.views import CaseViews
from mipseg.dataset import load_dataset
from mipseg.errors import InputError
from mipseg.inference.predictor import resolve_model_dir

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
PORT_TRIES = 20  # the default port is taken (a second session): try the next ones, as Jupyter does


def open_session(
    dataset: str | int,
    *,
    use_model: bool = True,
    trainer: str | None = None,
    labels: str | None = None,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "final",
    device: str = "auto",
) -> AnnotateSession:
    """Load a dataset for drawing and pick the model whose predictions pre-fill it.

    The dataset is checked as ``mipseg_validate --headers-only`` does, except that annotation
    files are not read: a wrong drawing is shown as "invalid" on the page, to be redrawn.
    Without ``trainer``/``labels``/``folds`` a missing model is not an error (the page offers the
    other starting points and says why); with them it is.

    Raises
    ------
    InputError
        A broken dataset, a dataset without annotation mode, or an explicitly chosen model that
        does not exist.
    """
    loaded = load_dataset(dataset, read_voxels=False, check_annotations=False)
    store = AnnotationStore(loaded)
    model, note = None, "started with --no-model"
    if use_model:
        try:
            model_dir = resolve_model_dir(loaded.name, trainer, labels)
            model = ModelPrefill(store, model_dir, folds=folds, checkpoint=checkpoint, device=device)
        except InputError as error:
            if trainer is not None or labels is not None or folds is not None:
                raise
            note = error.problems[0]
    return AnnotateSession(store, CaseViews(store), model, note)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int, explicit_port: bool) -> socket.socket:
    """A listening socket on ``host:port``; if the default port is taken, the next free one.

    Raises
    ------
    InputError
        The address cannot be bound (taken explicit port, unknown host).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [port] if explicit_port or port == 0 else range(port, port + PORT_TRIES)
    last_error: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(128)  # listening before the URL is printed: early requests wait, not fail
            return sock
        except OSError as error:
            sock.close()
            last_error = error
    tried = f"port {port}" if len(candidates) == 1 else f"ports {port}-{port + PORT_TRIES - 1}"
    raise InputError(f"--host {host} {tried}: cannot listen ({last_error.strerror or last_error})")


def serve(
    session: AnnotateSession,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    explicit_port: bool = False,
    token: str | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the page until Ctrl-C (or SIGTERM); the model thread stops with it.

    Parameters
    ----------
    token
        ``None``: a random one. ``""`` (no token) is allowed on loopback only.
    announce
        Receives the lines to show (the URL first).

    Raises
    ------
    InputError
        An empty token off loopback, or the address cannot be bound.
    """
    import uvicorn

    if token is None:
        token = secrets.token_urlsafe(24)
    if not token and not is_loopback(host):
        raise InputError(f"--host {host}: other machines can reach it, so it needs a token (omit --token)")
    sock = bind_socket(host, port, explicit_port)
    bound_port = sock.getsockname()[1]
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    url = f"http://{shown_host}:{bound_port}/" + (f"?token={token}" if token else "")
    server = uvicorn.Server(
        uvicorn.Config(create_app(session, token), log_level="warning", access_log=False, lifespan="off")
    )
    session.start_model()
    announce(f"mipseg_annotate: {session.store.dataset.name} ({session.store.spec.annotation} mode)")
    announce(f"open {url}")
    status = session.model_status()
    announce(
        f"model pre-fill: {status['model'] or 'none'}" + (f" ({status['error']})" if status["error"] else "")
    )
    announce("Ctrl-C stops the server; every saved drawing is already on disk")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled, after a clean shutdown
    finally:
        session.stop_model()
        sock.close()
    announce("mipseg_annotate stopped")
