"""mipseg_annotate at the HTTP level: save/load round trip, history, refusals, token, model pre-fill."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import tiny_plans
from PIL import Image

with warnings.catch_warnings():  # Starlette >= 1.10 prefers httpx2 and warns about httpx
    warnings.filterwarnings("ignore", message="Using `httpx`")
    from starlette.testclient import TestClient

from mipseg import io, paths
from mipseg.annotate.annotate_api import bind_socket, is_loopback, open_session, serve
from mipseg.annotate.prefill import project_labels
from mipseg.annotate.server import create_app
from mipseg.annotation_png import read_annotation, read_annotation_values
from mipseg.errors import InputError
from mipseg.labelset import LabelSet, LabelSetWriter
from mipseg.planning.mip import maximum_intensity_projection

TOKEN = "test-token"
HEADERS = {"X-Mipseg-Token": TOKEN}
SHAPE = (12, 20, 24)


@pytest.fixture
def vessels(data_roots):
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(
        981, "vessels", num_cases=2, num_test_cases=0, shape=SHAPE, mip_axes=(0, 1), show_progress=False
    )
    return paths.raw_dataset_dir(981)


@pytest.fixture
def organs(data_roots):
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(982, "organs", num_cases=2, num_test_cases=0, shape=SHAPE, show_progress=False)
    return paths.raw_dataset_dir(982)


def client_for(dataset: int, token: str = TOKEN, **options) -> TestClient:
    return TestClient(create_app(open_session(dataset, **options), token))


def drawing_of(response) -> np.ndarray:
    meta = response.json() if response.headers["content-type"].startswith("application/json") else None
    assert meta is None, meta
    import json

    shape = json.loads(response.headers["x-mipseg-meta"])
    return np.frombuffer(response.content, np.uint8).reshape(shape["rows"], shape["cols"])


def put(client: TestClient, url: str, drawing: np.ndarray, version: str, **params) -> object:
    query = {"rows": drawing.shape[0], "cols": drawing.shape[1], **params}
    return client.put(
        url,
        params=query,
        content=np.ascontiguousarray(drawing, np.uint8).tobytes(),
        headers={**HEADERS, "X-Base-Version": version},
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_token_is_required_for_the_page_and_the_data(vessels: Path) -> None:
    client = client_for(981)
    assert client.get("/").status_code == 403
    assert "?token=" in client.get("/api/dataset").text
    assert client.get("/api/dataset", headers={"X-Mipseg-Token": "wrong"}).status_code == 403
    assert client.get("/api/cases/vessels_000/mip/0/plane").status_code == 403
    assert client.get(f"/?token={TOKEN}").status_code == 200
    assert client.get("/api/dataset", headers=HEADERS).json()["mode"] == "mip"
    assert client.get(f"/api/dataset?token={TOKEN}").status_code == 200
    # the page's own script is public (it holds no data); nothing outside static/ is served there
    assert client.get("/static/app.js").status_code == 200
    for escape in (
        "/static/../../pyproject.toml",
        "/static/%2E%2E/%2E%2E/pyproject.toml",
        "/static/..%2F..%2Fio.py",
        "/static/%2E%2E/api/dataset",
    ):
        response = client.get(escape)
        assert response.status_code in (403, 404) and b"[project]" not in response.content
        assert b"vessels_000" not in response.content
    open_client = client_for(981, token="")
    assert open_client.get("/api/dataset").status_code == 200


def test_off_loopback_needs_a_token(vessels: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")
    session = open_session(981, use_model=False)
    with pytest.raises(InputError, match="needs a token"):
        serve(session, host="0.0.0.0", port=0, token="", announce=lambda line: None)
    taken = bind_socket("127.0.0.1", 0, explicit_port=True)
    taken.listen()
    with pytest.raises(InputError, match="cannot listen"):
        bind_socket("127.0.0.1", taken.getsockname()[1], explicit_port=True)
    taken.close()


def test_save_load_round_trip_keeps_the_previous_version(vessels: Path) -> None:
    client = client_for(981)
    url = "/api/cases/vessels_000/mip/1/annotation"
    path = vessels / "annotationsTr" / "vessels_000_mip1.png"
    original = read_annotation_values(path)
    loaded = client.get(url, headers=HEADERS)
    version = loaded.headers["x-mipseg-meta"]
    meta = __import__("json").loads(version)
    assert meta["exists"] and meta["rows"] == SHAPE[0] and meta["cols"] == SHAPE[2]
    np.testing.assert_array_equal(drawing_of(loaded), original > 0)

    drawing = np.zeros((SHAPE[0], SHAPE[2]), np.uint8)
    drawing[3, 2:20] = 1
    saved = put(client, url, drawing, meta["version"])
    assert saved.status_code == 200, saved.text
    assert saved.json()["state"] == "valid" and saved.json()["version"] != meta["version"]
    spec = open_session(981, use_model=False).store.spec
    np.testing.assert_array_equal(read_annotation(path, spec), drawing)
    assert Image.open(path).mode == "L"  # 8-bit grey, as mipseg_validate expects
    np.testing.assert_array_equal(drawing_of(client.get(url, headers=HEADERS)), drawing)

    history = client.get("/api/cases/vessels_000/mip/1/history", headers=HEADERS).json()["versions"]
    assert len(history) == 1
    previous = client.get(
        "/api/cases/vessels_000/mip/1/prefill", params={"source": f"history:{history[0]}"}, headers=HEADERS
    )
    np.testing.assert_array_equal(drawing_of(previous), original > 0)
    assert [p.name for p in (vessels / "annotationsTr").iterdir() if p.name.startswith(".")] == [".history"]

    # a second tab still holding the first version is refused, then may force
    stale = put(client, url, drawing * 0 + 1, meta["version"])
    assert stale.status_code == 409 and stale.json()["version"] == saved.json()["version"]
    assert put(client, url, np.ones_like(drawing), meta["version"], force="1").status_code == 200
    assert len(client.get("/api/cases/vessels_000/mip/1/history", headers=HEADERS).json()["versions"]) == 2

    from typer.testing import CliRunner

    from mipseg.cli.validate import app as validate_app

    assert CliRunner().invoke(validate_app, ["-d", "981", "--require-annotations"]).exit_code == 0


@pytest.mark.parametrize(
    "url",
    [
        "/api/cases/nobody/mip/0/plane",
        "/api/cases/..%2F..%2Fdataset.json/mip/0/annotation",
        "/api/cases/../../etc/passwd/mip/0/annotation",
        "/api/cases/%2E%2E/mip/0/annotation",
        "/api/cases/vessels_000/slice/3/plane",
        "/api/cases/vessels_000/mip/2/plane",
        "/api/cases/vessels_000/mip/-1/plane",
        "/api/cases/vessels_000/mip/0x1/annotation",
        "/api/cases/vessels_000/mip/0/depth/../../../../pyproject.toml",
        "/api/cases/vessels_000/mip/0/prefill?source=labels:../../raw",
        "/api/cases/vessels_000/mip/0/prefill?source=history:../../dataset",
        "/api/cases/vessels_000/mip/0/prefill?source=model",
        "/api/cases/vessels_000/mip/0/prefill?source=magic",
    ],
)
def test_requests_outside_the_dataset_are_refused(vessels: Path, url: str) -> None:
    client = client_for(981, use_model=False)
    before = snapshot(vessels.parent.parent)
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(method, url, headers=HEADERS, content=b"\x01" * (SHAPE[1] * SHAPE[2]))
        assert response.status_code in (404, 405), (method, url, response.status_code, response.text)
    assert snapshot(vessels.parent.parent) == before


def test_bad_drawings_are_refused_and_nothing_is_written(vessels: Path) -> None:
    client = client_for(981)
    url = "/api/cases/vessels_001/mip/0/annotation"
    version = __import__("json").loads(client.get(url, headers=HEADERS).headers["x-mipseg-meta"])["version"]
    before = snapshot(vessels)
    good = np.zeros(SHAPE[1:], np.uint8)
    good[4, 4] = 1
    cases = [
        (put(client, url, good.T, version), 422, "grid is 20 x 24"),
        (put(client, url, good * 2, version), 422, "values [2] are not labels"),
        (put(client, url, good * 0, version), 422, "nothing drawn"),
        (
            client.put(url, params={"rows": 20, "cols": 24}, content=b"\x01" * 10, headers=HEADERS),
            422,
            "10 bytes sent",
        ),
        (
            client.put(url, params={"rows": 20, "cols": 24}, content=b"\x01" * 10_000, headers=HEADERS),
            413,
            "480 expected",
        ),
        (
            client.put(url, params={"rows": "x", "cols": 24}, content=good.tobytes(), headers=HEADERS),
            422,
            "rows",
        ),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    assert snapshot(vessels) == before


def test_concurrent_saves_never_leave_a_half_file(vessels: Path) -> None:
    client = client_for(981)
    url = "/api/cases/vessels_000/mip/0/annotation"
    path = vessels / "annotationsTr" / "vessels_000_mip0.png"
    drawings = []
    for k in range(6):
        drawing = np.zeros(SHAPE[1:], np.uint8)
        drawing[k : k + 3, :] = 1
        drawings.append(drawing)
    original = read_annotation_values(path) > 0
    results, torn = [], []

    def save(drawing: np.ndarray) -> None:
        results.append(put(client, url, drawing, "", force="1").status_code)

    def read_while_saving() -> None:
        for _ in range(40):
            try:
                current = read_annotation_values(path) > 0
            except InputError as error:  # a torn file would be unreadable
                torn.append(str(error))
                continue
            if not any(np.array_equal(current, d) for d in [original, *drawings]):
                torn.append(f"a file that is none of the drawings ({current.sum()} pixels)")

    threads = [threading.Thread(target=save, args=(d,)) for d in drawings] + [
        threading.Thread(target=read_while_saving)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * len(drawings) and not torn
    final = read_annotation_values(path) > 0
    assert any(np.array_equal(final, d) for d in drawings)
    history = sorted((vessels / "annotationsTr" / ".history").iterdir())
    assert len(history) == len(drawings)  # the original and every save but the last
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]


def test_every_slice_of_suggest_n_is_marked(organs: Path) -> None:
    io.write_json(  # mipseg_propagate --suggest 2: the best slice first, then the one that adds most
        {"cases": {"organs_000": {"slice": 7, "slices": [7, 3], "axis": 0}}},
        paths.preprocessed_dataset_dir(982) / "suggested_slices.json",
    )
    client = client_for(982)
    entry = next(
        c for c in client.get("/api/dataset", headers=HEADERS).json()["cases"] if c["case"] == "organs_000"
    )
    assert entry["suggested_slice"] == 7 and entry["suggested_slices"] == [7, 3]
    meta = {
        index: __import__("json").loads(
            client.get(f"/api/cases/organs_000/slice/{index}/plane", headers=HEADERS).headers["x-mipseg-meta"]
        )["suggested"]
        for index in (7, 3, 5)
    }
    assert meta == {7: True, 3: True, 5: False}


def test_slice_mode_new_slices_suggestion_and_delete(organs: Path) -> None:
    io.write_json(
        {"cases": {"organs_000": {"slice": 7, "axis": 0}}},
        paths.preprocessed_dataset_dir(982) / "suggested_slices.json",
    )
    client = client_for(982)
    dataset = client.get("/api/dataset", headers=HEADERS).json()
    assert dataset["mode"] == "slice" and dataset["labels"][1] == {"name": "organ", "value": 1}
    entry = next(c for c in dataset["cases"] if c["case"] == "organs_000")
    assert entry["suggested_slice"] == 7 and entry["state"] == "valid"
    plane = client.get("/api/cases/organs_000/slice/7/plane", headers=HEADERS)
    meta = __import__("json").loads(plane.headers["x-mipseg-meta"])
    volume, _ = io.read_image(organs / "imagesTr" / "organs_000_0000.nii.gz", np.float32)
    np.testing.assert_array_equal(np.frombuffer(plane.content, "<f4").reshape(SHAPE[1:]), volume[7])
    assert meta["suggested"] and meta["spacing"] == [1.0, 1.0]
    assert client.get("/api/cases/organs_000/slice/12/plane", headers=HEADERS).status_code == 404

    drawing = np.zeros(SHAPE[1:], np.uint8)
    drawing[5:9, 5:9] = 1
    assert put(client, "/api/cases/organs_000/slice/2/annotation", drawing, "").status_code == 200
    assert (organs / "annotationsTr" / "organs_000_slice2.png").is_file()
    entry = next(
        c for c in client.get("/api/cases", headers=HEADERS).json()["cases"] if c["case"] == "organs_000"
    )
    assert 2 in [t["index"] for t in entry["targets"]] and len(entry["targets"]) == 2
    # an empty slice is saved in slice mode: the annotator says the organ is not there
    empty = put(client, "/api/cases/organs_000/slice/10/annotation", drawing * 0, "")
    assert empty.status_code == 200 and empty.json()["state"] == "valid", empty.text
    assert not np.any(np.asarray(Image.open(organs / "annotationsTr" / "organs_000_slice10.png")))

    saved = __import__("json").loads(
        client.get("/api/cases/organs_000/slice/2/annotation", headers=HEADERS).headers["x-mipseg-meta"]
    )
    gone = client.delete(
        "/api/cases/organs_000/slice/2/annotation", headers={**HEADERS, "X-Base-Version": "x"}
    )
    assert gone.status_code == 409
    gone = client.delete(
        "/api/cases/organs_000/slice/2/annotation", headers={**HEADERS, "X-Base-Version": saved["version"]}
    )
    assert gone.status_code == 200 and gone.json()["state"] == "none"
    assert not (organs / "annotationsTr" / "organs_000_slice2.png").exists()
    assert len(list((organs / "annotationsTr" / ".history").glob("organs_000_slice2.*.png"))) == 1


def test_invalid_file_on_disk_is_shown_and_can_be_replaced(vessels: Path) -> None:
    path = vessels / "annotationsTr" / "vessels_001_mip0.png"
    colour = np.zeros((*SHAPE[1:], 3), np.uint8)
    colour[3:6, 3:9] = (255, 0, 0)
    Image.fromarray(colour).save(path)
    client = client_for(981)  # opens although mipseg_validate would refuse the dataset
    entry = next(
        c for c in client.get("/api/cases", headers=HEADERS).json()["cases"] if c["case"] == "vessels_001"
    )
    assert entry["state"] == "invalid" and "colour" in entry["targets"][0]["problem"]
    loaded = client.get("/api/cases/vessels_001/mip/0/annotation", headers=HEADERS)
    meta = __import__("json").loads(loaded.headers["x-mipseg-meta"])
    assert meta["exists"] and "colour" in meta["problem"] and loaded.content == b""
    drawing = (colour[..., 0] > 0).astype(np.uint8)
    assert put(client, "/api/cases/vessels_001/mip/0/annotation", drawing, meta["version"]).status_code == 200
    entry = next(
        c for c in client.get("/api/cases", headers=HEADERS).json()["cases"] if c["case"] == "vessels_001"
    )
    assert entry["state"] == "valid"


def test_prefill_threshold_and_label_set_projection(vessels: Path) -> None:
    volume, geometry = io.read_image(vessels / "imagesTr" / "vessels_000_0000.nii.gz", np.float32)
    truth, _ = io.read_image(vessels / "labelsTr" / "vessels_000.nii.gz")
    labels = np.where(np.random.default_rng(0).random(SHAPE) < 0.3, 2, truth).astype(np.uint8)
    # made as a producer makes it: label map, then labelset.json and report.json
    labelset = LabelSet.of(981, "pseudo")
    io.write_image(labels, geometry, labelset.label_path("vessels_000"))
    writer = LabelSetWriter(
        labelset, {"made_by": "test", "labels": {"background": 0, "vessel": 1}, "ignore": 2, "settings": {}}
    )
    writer.add_case("vessels_000", {})
    client = client_for(981)
    assert client.get("/api/dataset", headers=HEADERS).json()["labelsets"] == ["pseudo"]
    _, depth = maximum_intensity_projection(volume, 1)
    projected = client.get("/api/cases/vessels_000/mip/1/prefill?source=labels:pseudo", headers=HEADERS)
    np.testing.assert_array_equal(drawing_of(projected), project_labels(labels, 1, depth, 2))
    assert (
        client.get("/api/cases/vessels_001/mip/1/prefill?source=labels:pseudo", headers=HEADERS).status_code
        == 404
    )
    mip = volume.max(axis=0)
    level = float(np.percentile(mip, 80))
    thresholded = client.get(
        f"/api/cases/vessels_000/mip/0/prefill?source=threshold&level={level}", headers=HEADERS
    )
    np.testing.assert_array_equal(drawing_of(thresholded), mip > level)
    default = client.get("/api/cases/vessels_000/mip/0/prefill?source=threshold", headers=HEADERS)
    assert 0 < drawing_of(default).sum() < mip.size


def make_random_model(dataset: int) -> Path:
    """A one-fold model folder with random weights (enough to test the plumbing)."""
    from mipseg.training.checkpoint import save_checkpoint
    from mipseg.training.network import build_network

    resampling = {
        "data_order": 1,
        "data_order_z": 0,
        "seg_order": 1,
        "seg_order_z": 0,
        "probabilities_order": 1,
        "probabilities_order_z": 0,
        "separate_z_anisotropy_threshold": 3.0,
    }
    plans = dataclasses.replace(tiny_plans(patch_size=(8, 16, 16), features=(4, 8)), resampling=resampling)
    spec = io.read_json(paths.raw_dataset_dir(dataset) / "dataset.json")
    model_dir = paths.results_dataset_dir(dataset) / "plain__pseudo__3d_fullres"
    io.write_json(plans.to_json(), model_dir / "plans.json")
    io.write_json(spec, model_dir / "dataset.json")
    torch.manual_seed(0)
    network = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=True)
    checkpoint = {
        "network_weights": network.state_dict(),
        "plans": plans.to_json(),
        "dataset_json": spec,
        "num_input_channels": 1,
        "num_classes": 2,
        "dropout": 0.0,
        "trainer": "plain",
        "labelset": "pseudo",
        "fold": 0,
        "epoch": 1,
    }
    save_checkpoint(checkpoint, model_dir / "fold_0" / "checkpoint_final.pt")
    return model_dir


def test_model_prefill_is_predicted_cached_and_orders_the_cases(vessels: Path) -> None:
    from mipseg.inference.predictor import Predictor

    torch.set_num_threads(1)
    model_dir = make_random_model(981)
    session = open_session(981, device="cpu")
    client = TestClient(create_app(session, TOKEN))
    assert client.get("/api/status", headers=HEADERS).json()["model"] == model_dir.name
    session.start_model()
    assert session.model.wait(120)
    status = client.get("/api/status", headers=HEADERS).json()
    assert status["state"] == "ready" and status["done"] == 2, status
    cached = paths.preprocessed_dataset_dir(981) / "annotate" / model_dir.name / "vessels_000.npz"
    assert cached.is_file()

    predictor = Predictor.from_model_folder(model_dir, use_mirroring=False, device="cpu")
    volume, geometry = io.read_image(vessels / "imagesTr" / "vessels_000_0000.nii.gz", np.float32)
    probabilities = predictor.predict_case(volume[None], geometry)
    _, depth = maximum_intensity_projection(volume, 0)
    prefill = client.get("/api/cases/vessels_000/mip/0/prefill?source=model", headers=HEADERS)
    np.testing.assert_array_equal(drawing_of(prefill), project_labels(probabilities.argmax(0), 0, depth, 99))

    cases = client.get("/api/cases", headers=HEADERS).json()["cases"]
    expected = [c["expected_changes"] for c in cases]
    assert all(e is not None and e >= 0 for e in expected) and expected == sorted(expected, reverse=True)

    # a second session reads the cache instead of predicting; a retrained model is predicted again
    again = open_session(981, device="cpu")
    again.start_model()
    assert again.model.wait(60) and again.model._predictor is None
    checkpoint = model_dir / "fold_0" / "checkpoint_final.pt"
    os.utime(checkpoint, ns=(time.time_ns(), time.time_ns()))
    third = open_session(981, device="cpu")
    third.start_model()
    assert third.model.wait(120) and third.model._predictor is not None
    with pytest.raises(InputError, match="no model folder"):
        open_session(981, trainer="mip", labels="pseudo")


def test_ctrl_c_stops_the_server_cleanly(vessels: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-u", "-c", "from mipseg.cli.annotate import main; main()"]
        + ["-d", "981", "--port", "0", "--no-model"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        deadline = time.time() + 60
        while url is None and time.time() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, "mipseg_annotate exited before printing its URL"
            if line.startswith("open "):
                url = line.split()[1]
        assert url and "?token=" in url and url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"app.js" in response.read()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "mipseg_annotate stopped" in output and "Traceback" not in output


def test_several_classes_are_saved_as_their_values(organs: Path) -> None:
    spec = io.read_json(organs / "dataset.json")
    spec["labels"] = {"background": 0, "organ": 1, "tumour": 2}
    io.write_json(spec, organs / "dataset.json")
    client = client_for(982)
    labels = client.get("/api/dataset", headers=HEADERS).json()["labels"]
    assert [label["value"] for label in labels] == [0, 1, 2]
    drawing = np.zeros(SHAPE[1:], np.uint8)
    drawing[2:5, 2:5], drawing[8:10, 8:12] = 1, 2
    assert put(client, "/api/cases/organs_001/slice/4/annotation", drawing, "").status_code == 200
    path = organs / "annotationsTr" / "organs_001_slice4.png"
    np.testing.assert_array_equal(read_annotation_values(path), drawing)
    refused = put(client, "/api/cases/organs_001/slice/5/annotation", drawing * 2, "")
    assert refused.status_code == 422 and "values [4] are not labels [0, 1, 2]" in refused.json()["error"]
    threshold = client.get("/api/cases/organs_001/slice/4/prefill?source=threshold&value=2", headers=HEADERS)
    assert set(np.unique(drawing_of(threshold)).tolist()) <= {0, 2}


def test_command_reports_bad_input_in_one_line(vessels: Path) -> None:
    from typer.testing import CliRunner

    from mipseg.cli.annotate import app

    runner = CliRunner()
    result = runner.invoke(app, ["-d", "981", "--host", "0.0.0.0", "--token", "", "--no-model"])
    assert result.exit_code == 2 and "needs a token" in result.output
    result = runner.invoke(app, ["-d", "981", "--trainer", "mip", "--labels", "pseudo"])
    assert result.exit_code == 2 and "no trained model" in result.output
    spec = io.read_json(vessels / "dataset.json")
    del spec["annotation"]
    io.write_json(spec, vessels / "dataset.json")
    (vessels / "annotationsTr").rename(vessels / "drawings")
    result = runner.invoke(app, ["-d", "981"])
    assert result.exit_code == 2 and "no 'annotation' mode" in result.output
    assert "Traceback" not in result.output
