"""The web application behind ``mipseg_annotate`` (Starlette; uvicorn serves it).

Routes (``{case}/{kind}/{index}`` is one drawing, e.g. ``vessels_000/mip/0`` or ``liver_003/slice/24``)::

    GET    /?token=T                         the page
    GET    /static/...                       its script and style (mipseg's own files, no data)
    GET    /api/dataset                      name, mode, labels, axes, label sets, model, cases
    GET    /api/cases                        case list with states, least-sure-first when a model exists
    GET    /api/status                       the model's background predictions
    GET    /api/cases/{case}/{kind}/{index}/plane       float32 intensities (rows x cols)
    GET    /api/cases/{case}/{kind}/{index}/depth       uint16 depth map of a MIP
    GET    /api/cases/{case}/{kind}/{index}/annotation  uint8 classes of the saved drawing
    PUT    /api/cases/{case}/{kind}/{index}/annotation  save (body: rows x cols class bytes)
    DELETE /api/cases/{case}/{kind}/{index}/annotation  move the file to .history/
    GET    /api/cases/{case}/{kind}/{index}/prefill?source=empty|threshold|labels:NAME|model|history:STAMP
    GET    /api/cases/{case}/{kind}/{index}/history     saved-over versions, newest first

Binary answers carry their shape and context as JSON in the ``X-Mipseg-Meta`` header. Every
``/`` and ``/api`` request needs the session token (``?token=`` or the ``X-Mipseg-Token`` header),
unless the server was started on loopback with an empty token. The token is never put in a
cookie, so another web site open in the same browser cannot make requests on the user's behalf.
Refusals: 403 wrong token, 404 not part of the dataset, 409 saved elsewhere meanwhile (or the
model has not predicted the case yet), 413 body too large, 422 a drawing that fails the checks.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mipseg.annotate import prefill
from mipseg.annotate.model_prefill import ModelPrefill
from mipseg.annotate.store import AnnotationStore, Conflict, Refused, Target
from mipseg.annotate.views import CaseViews, suggested_slices
from mipseg.errors import InputError

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_HEADER = "x-mipseg-token"
META_HEADER = "X-Mipseg-Meta"
NO_TOKEN_MESSAGE = (
    "this mipseg_annotate server needs its token: open the URL it printed (it ends in ?token=...)"
)


class TokenGate:
    """ASGI middleware: every request except ``/static/`` must carry the session token."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        public = scope.get("path", "").startswith("/static/") and ".." not in scope.get("path", "")
        if scope["type"] == "http" and self.token and not public:
            request = Request(scope)
            supplied = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
            if not secrets.compare_digest(supplied.encode(), self.token.encode()):
                await PlainTextResponse(NO_TOKEN_MESSAGE, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AnnotateSession:
    """What the routes share: the dataset's files, its images, label sets and the model."""

    def __init__(self, store: AnnotationStore, views: CaseViews, model: ModelPrefill | None, model_note: str):
        self.store = store
        self.views = views
        self.model = model
        self.model_note = model_note
        self.suggested = suggested_slices(store.dataset.name)
        self._labelsets: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def target(self, request: Request) -> Target:
        params = request.path_params
        return self.store.target(params["case"], params["kind"], params["index"])

    def labelset(self, name: str, case_id: str) -> np.ndarray:
        """A case of a label set, kept for the next slice (small LRU keyed by file time)."""
        if name not in prefill.labelset_names(self.store.dataset.name, [case_id]):
            raise Refused(f"label set {name!r} has no map of case {case_id}")
        shape = self.store.image_shape(case_id)
        key = (name, case_id)
        with self._lock:
            if key in self._labelsets:
                self._labelsets.move_to_end(key)
                return self._labelsets[key]
        labels = prefill.read_labelset_case(self.store.dataset.name, name, case_id, shape)
        with self._lock:
            self._labelsets[key] = labels
            while len(self._labelsets) > 2:
                self._labelsets.popitem(last=False)
        return labels

    def cases(self) -> list[dict[str, Any]]:
        """Case summaries, ordered least-sure-first once the model has predicted them."""
        entries = []
        for position, case_id in enumerate(self.store.case_ids):
            entry = self.store.case_summary(case_id)
            suggested = self.suggested.get(case_id, [])
            entry["suggested_slices"] = suggested
            entry["suggested_slice"] = suggested[0] if suggested else None
            entry["expected_changes"] = (
                self.model.case_expected_changes(case_id, entry["suggested_slice"]) if self.model else None
            )
            entry["position"] = position
            entries.append(entry)
        if self.model is not None:
            entries.sort(key=lambda e: (e["expected_changes"] is None, -(e["expected_changes"] or 0)))
        return entries

    def model_status(self) -> dict[str, Any]:
        if self.model is None:
            return {"model": None, "state": "none", "error": self.model_note}
        return self.model.status()

    def start_model(self) -> None:
        if self.model is not None:
            self.model.start([entry["case"] for entry in self.cases()])

    def stop_model(self) -> None:
        if self.model is not None:
            self.model.stop()


def binary(array: np.ndarray, dtype: str, meta: dict[str, Any]) -> Response:
    """Raw little-endian bytes of ``array`` with ``meta`` as JSON in a header."""
    return Response(
        np.ascontiguousarray(array, dtype=dtype).tobytes(),
        media_type="application/octet-stream",
        headers={META_HEADER: json.dumps(meta), "Cache-Control": "no-store"},
    )


def create_app(session: AnnotateSession, token: str) -> TokenGate:
    """The Starlette application of one annotation session; ``token=""`` turns the check off."""

    def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    def dataset(request: Request) -> JSONResponse:
        store = session.store
        return JSONResponse(
            {
                "name": store.dataset.name,
                "mode": store.spec.annotation,
                "labels": [{"name": n, "value": v} for n, v in store.spec.class_labels.items()],
                "mip_axes": list(store.spec.mip_axes),
                "labelsets": prefill.labelset_names(store.dataset.name, store.case_ids),
                "model": session.model_status(),
                "cases": session.cases(),
            }
        )

    def cases(request: Request) -> JSONResponse:
        return JSONResponse({"cases": session.cases(), "model": session.model_status()})

    def status(request: Request) -> JSONResponse:
        return JSONResponse(session.model_status())

    def plane(request: Request) -> Response:
        target = session.target(request)
        image = session.views.plane(target)
        meta = session.views.describe(target)
        meta.update(minimum=float(image.min()), maximum=float(image.max()))
        meta["suggested"] = target.kind == "slice" and target.index in session.suggested.get(
            target.case_id, []
        )
        return binary(image, "<f4", meta)

    def depth(request: Request) -> Response:
        target = session.target(request)
        depth_map = session.views.depth(target)
        if depth_map is None:
            raise Refused("slices have no depth map")
        extent = session.store.image_shape(target.case_id)[target.index]
        return binary(depth_map, "<u2", {"depth": extent})

    def annotation(request: Request) -> Response:
        target = session.target(request)
        classes, version, problem = session.store.load(target)
        rows, cols = session.store.grid(target)
        meta = {"rows": rows, "cols": cols, "version": version, "problem": problem, "exists": bool(version)}
        if classes is None:
            classes = np.zeros((0,), np.uint8)
        return binary(classes, "u1", meta)

    async def save(request: Request) -> JSONResponse:
        target = await run_in_threadpool(session.target, request)
        rows, cols = session.store.grid(target)
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > rows * cols:
            return JSONResponse(
                {"error": f"body of {length or 'unknown'} bytes; {rows * cols} expected"}, 413
            )
        body = await request.body()
        shape = (_int_param(request, "rows"), _int_param(request, "cols"))
        classes = await run_in_threadpool(session.store.check_drawing, target, body, *shape)
        state = await run_in_threadpool(
            session.store.save,
            target,
            classes,
            request.headers.get("x-base-version", ""),
            request.query_params.get("force") == "1",
        )
        return JSONResponse({"saved": target.file_name, **state})

    def delete(request: Request) -> JSONResponse:
        target = session.target(request)
        state = session.store.delete(
            target, request.headers.get("x-base-version", ""), request.query_params.get("force") == "1"
        )
        return JSONResponse({"deleted": target.file_name, **state})

    def history(request: Request) -> JSONResponse:
        return JSONResponse({"versions": session.store.history(session.target(request))})

    def prefill_drawing(request: Request) -> Response:
        target = session.target(request)
        source = request.query_params.get("source", "empty")
        rows, cols = session.store.grid(target)
        meta: dict[str, Any] = {"source": source}
        ignore = session.store.spec.ignore_label
        if source == "empty":
            drawing = np.zeros((rows, cols), np.uint8)
        elif source == "threshold":
            image = session.views.plane(target)
            level = request.query_params.get("level")
            meta["level"] = float(level) if _is_number(level) else prefill.default_level(image)
            drawing = prefill.threshold_drawing(image, meta["level"], _int_param(request, "value", 1))
        elif source.startswith("labels:"):
            labels = session.labelset(source[len("labels:") :], target.case_id)
            depth_map = session.views.depth(target)
            drawing = prefill.labels_on_target(labels, target.kind, target.index, depth_map, ignore)
        elif source == "model":
            if session.model is None:
                raise Refused(f"no trained model ({session.model_note})")
            labels = session.model.labels(target.case_id)
            if labels is None:
                entry = session.model.status()["cases"][target.case_id]
                return JSONResponse(
                    {"error": f"the model has not predicted {target.case_id} yet", **entry}, 409
                )
            depth_map = session.views.depth(target)
            drawing = prefill.labels_on_target(labels, target.kind, target.index, depth_map, ignore)
        elif source.startswith("history:"):
            drawing = session.store.load_history(target, source[len("history:") :])
        else:
            raise Refused(f"unknown pre-fill source {source!r}")
        unknown = set(np.unique(drawing).tolist()) - set(session.store.class_values)
        drawing = np.where(np.isin(drawing, list(unknown)), 0, drawing) if unknown else drawing
        meta.update(rows=rows, cols=cols)
        return binary(drawing, "u1", meta)

    drawing_path = "/api/cases/{case}/{kind}/{index}"
    routes = [
        Route("/", index),
        Route("/api/dataset", dataset),
        Route("/api/cases", cases),
        Route("/api/status", status),
        Route(drawing_path + "/plane", plane),
        Route(drawing_path + "/depth", depth),
        Route(drawing_path + "/annotation", annotation, methods=["GET"]),
        Route(drawing_path + "/annotation", save, methods=["PUT"]),
        Route(drawing_path + "/annotation", delete, methods=["DELETE"]),
        Route(drawing_path + "/prefill", prefill_drawing),
        Route(drawing_path + "/history", history),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    handlers = {
        Refused: lambda request, error: JSONResponse({"error": str(error)}, 404),
        Conflict: lambda request, error: JSONResponse({"error": str(error), "version": error.version}, 409),
        InputError: lambda request, error: JSONResponse({"error": "; ".join(error.problems)}, 422),
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return TokenGate(app, token)


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and np.isfinite(float(text))
    except ValueError:
        return False


def _int_param(request: Request, name: str, default: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None and default is not None:
        return default
    if text is None or not text.isdigit():
        raise InputError(f"query parameter {name}={text!r} must be a non-negative integer")
    return int(text)
