"""Full-size paths on tiny volumes: the streamed export equals the whole-array one; every engine and
precision gives the plain path's label map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import dataset_json, make_model, run_cli, tiny_plans, write_case

from mipseg import io
from mipseg.errors import InputError
from mipseg.inference import engines
from mipseg.inference.export import probabilities_to_segmentation, segmentation_on_raw_grid
from mipseg.inference.predictor import Predictor
from mipseg.planning.preprocessing import preprocess_case, revert_preprocessing
from mipseg.training.network import build_network


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _raw_case(shape=(9, 21, 23), spacing=(3.0, 0.8, 0.9), seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[1:-1, 3:-2, 2:-4] = rng.normal(100, 20, (shape[0] - 2, shape[1] - 5, shape[2] - 6))
    return image[None], io.Geometry.identity(spacing)


@pytest.mark.parametrize("spacing", [(3.0, 0.8, 0.9), (1.3, 0.8, 0.9)])  # separate-z and plain 3D resampling
def test_streamed_export_equals_whole_array_export(spacing) -> None:
    plans = tiny_plans(spacing=(1.0, 1.0, 1.0))
    images, geometry = _raw_case(spacing=spacing)
    data, _, properties = preprocess_case(images, geometry, plans)
    assert data.shape[1:] != images.shape[1:]  # the probabilities really are resampled
    logits = np.random.default_rng(1).normal(size=(3, *data.shape[1:])).astype(np.float32)
    logits[2, :2] = logits[1, :2]  # exact ties: the first class must win in both paths
    probabilities = torch.softmax(torch.from_numpy(logits), 0).numpy()
    values = np.array([0, 1, 4])

    whole = revert_preprocessing(probabilities, properties, plans)
    expected = probabilities_to_segmentation(whole, values)
    streamed, kept = segmentation_on_raw_grid(
        probabilities, properties, plans, values, keep_probabilities=True
    )

    assert streamed.shape == images.shape[1:] and streamed.dtype == expected.dtype
    np.testing.assert_array_equal(streamed, expected)
    assert set(np.unique(streamed)) == {0, 1, 4}
    np.testing.assert_array_equal(kept, whole.astype(np.float16))
    assert segmentation_on_raw_grid(probabilities, properties, plans, values)[1] is None


def _predictor(engine: str, precision: str, mirror_axes=(0, 1, 2), batch_size=3) -> Predictor:
    plans = tiny_plans()
    torch.manual_seed(0)
    network = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=False)
    return Predictor(
        [network],
        plans,
        dataset_json(),
        mirror_axes=mirror_axes,
        batch_size=batch_size,
        device="cpu",
        engine=engine,
        precision=precision,
    )


# 20x33x37 with patch 8x16x16: 4x4x4 = 64 tiles, not a multiple of the batch of 3 (a padded last batch)
VOLUME = np.random.default_rng(0).normal(size=(1, 20, 33, 37)).astype(np.float32)


@pytest.mark.parametrize(
    "engine, precision",
    [
        ("torch", "bfloat16"),
        pytest.param(
            "openvino", "float32", marks=pytest.mark.skipif(not engines.openvino_available(), reason="")
        ),
        pytest.param(
            "openvino", "bfloat16", marks=pytest.mark.skipif(not engines.openvino_available(), reason="")
        ),
    ],
)
def test_every_engine_and_precision_gives_the_plain_label_map(engine: str, precision: str) -> None:
    plain = _predictor("torch", "float32").predict_preprocessed(VOLUME)
    fast = _predictor(engine, precision).predict_preprocessed(VOLUME)
    assert fast.shape == plain.shape == (2, 20, 33, 37)
    labels_plain, labels_fast = plain.argmax(0), fast.argmax(0)
    if precision == "float32":
        np.testing.assert_allclose(fast, plain, atol=1e-4)
        np.testing.assert_array_equal(labels_fast, labels_plain)
    else:
        # bfloat16 keeps 8 bits of mantissa: only near-ties may flip
        clear = np.abs(plain[1] - plain[0]) > 0.05
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(labels_fast[clear], labels_plain[clear])
        assert (labels_fast == labels_plain).mean() > 0.99


@pytest.mark.skipif(not engines.openvino_available(), reason="openvino not installed")
def test_openvino_model_is_converted_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MIPSEG_CACHE", str(tmp_path / "cache"))
    first = _predictor("openvino", "float32", mirror_axes=()).predict_preprocessed(VOLUME)
    cached = sorted((tmp_path / "cache" / "openvino").glob("*/model.xml"))
    assert len(cached) == 1 and cached[0].with_suffix(".bin").is_file()
    mtime = cached[0].stat().st_mtime_ns
    second = _predictor("openvino", "float32", mirror_axes=()).predict_preprocessed(VOLUME)
    assert cached[0].stat().st_mtime_ns == mtime  # read, not converted again
    np.testing.assert_array_equal(first, second)


def test_engine_choice_and_errors(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert engines.resolve_engine("torch", cpu) == "torch"
    with pytest.raises(InputError, match="--engine 'onnx'"):
        engines.resolve_engine("onnx", cpu)
    with pytest.raises(InputError, match="--precision 'fp8'"):
        engines.check_precision("fp8")
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    assert engines.resolve_engine("auto", cpu) == "torch"  # the clean fallback
    with pytest.raises(InputError, match="pip install openvino"):
        engines.resolve_engine("openvino", cpu)
    monkeypatch.setattr(engines, "openvino_available", lambda: True)
    assert engines.resolve_engine("auto", cpu) == "openvino"
    assert engines.resolve_engine("auto", torch.device("cuda")) == "torch"
    with pytest.raises(InputError, match="CPU only"):
        engines.resolve_engine("openvino", torch.device("cuda"))


def test_predict_cli_engine_flags_give_the_same_segmentation(data_roots, tmp_path: Path) -> None:
    make_model(folds=(0,))
    write_case(tmp_path / "in", "case0", io.Geometry.identity((2.0, 0.8, 1.1)))
    segmentations = {}
    engine_names = ["torch", "auto"] + (["openvino"] if engines.openvino_available() else [])
    for engine in engine_names:
        out = tmp_path / engine
        argv = ["-i", str(tmp_path / "in"), "-o", str(out), "-d", "990", "--engine", engine]
        assert run_cli([*argv, "--disable-tta", "--disable-progress-bar"]) == 0
        segmentations[engine] = io.read_image(out / "case0.nii.gz")[0]
        used = io.read_json(out / "predict_args.json")["engine_used"]
        # auto: a 12x20x24 volume needs far fewer passes than a conversion is worth
        assert used == ("torch" if engine == "auto" else engine)
    for engine in engine_names[1:]:
        np.testing.assert_array_equal(segmentations[engine], segmentations["torch"])
    bad = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "bad"), "-d", "990", "--precision", "half"]
    assert run_cli(bad) == 2


def test_default_augmentation_workers_follow_the_device() -> None:
    from mipseg.training.loop import default_num_workers

    assert default_num_workers(torch.device("cuda"), cpu_count=16) == 12  # nnU-Net's 12 DA processes
    assert default_num_workers(torch.device("cuda"), cpu_count=4) == 4  # never more than the CPUs
    assert default_num_workers(torch.device("cpu"), cpu_count=16) == 2
    assert default_num_workers(torch.device("cpu"), cpu_count=1) == 1


@pytest.mark.skipif(not engines.openvino_available(), reason="openvino not installed")
def test_auto_engine_converts_only_when_it_pays(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MIPSEG_CACHE", str(tmp_path / "cache"))
    small = _predictor("auto", "float32", mirror_axes=())
    small.predict_preprocessed(VOLUME)  # 64 passes < AUTO_OPENVINO_MIN_PASSES, nothing cached
    assert small.engine == "torch"
    monkeypatch.setattr(engines, "AUTO_OPENVINO_MIN_PASSES", 64)
    large = _predictor("auto", "float32", mirror_axes=())
    expected = large.predict_preprocessed(VOLUME)
    assert large.engine == "openvino"
    monkeypatch.setattr(engines, "AUTO_OPENVINO_MIN_PASSES", 10**9)
    cached = _predictor("auto", "float32", mirror_axes=())
    np.testing.assert_array_equal(cached.predict_preprocessed(VOLUME), expected)
    assert cached.engine == "openvino"  # the conversion is cached: always worth it
