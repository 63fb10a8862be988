"""Prediction: sliding window, fold ensemble, exact output geometry, parts, --continue, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mipseg import io, paths
from mipseg.cli.predict import expand_multi_value_options, main
from mipseg.errors import InputError
from mipseg.inference.export import remove_small_components, smallest_component_size
from mipseg.inference.predict_api import PredictionSettings, discover_cases, predict_folder, select_part
from mipseg.inference.predictor import Predictor, resolve_model_dir
from mipseg.planning.plans import NetworkTopology, Plans
from mipseg.sliding_window import (
    compute_steps,
    gaussian_importance_map,
    mirror_combinations,
    sliding_window_logits,
)
from mipseg.training.checkpoint import save_checkpoint
from mipseg.training.network import build_network

DATASET = "Dataset990_Tiny"
LABELS = {"background": 0, "vessel": 1, "ignore": 2}
PATCH = (8, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_plans(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Plans:
    return Plans(
        dataset_name=DATASET,
        spacing=list(spacing),
        original_median_spacing=list(spacing),
        median_shape=[12, 20, 24],
        patch_size=list(PATCH),
        batch_size=2,
        network=NetworkTopology(
            features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]]
        ),
        normalization=["ZScore"],
        use_mask_for_norm=[False],
        intensity_properties={},
        resampling={
            "data_order": 3,
            "data_order_z": 0,
            "seg_order": 1,
            "seg_order_z": 0,
            "probabilities_order": 1,
            "probabilities_order_z": 0,
            "separate_z_anisotropy_threshold": 3.0,
        },
        labels=LABELS,
        ignore_label=2,
    )


def dataset_json() -> dict:
    return {
        "channel_names": {"0": "MRA"},
        "labels": LABELS,
        "numTraining": 0,
        "file_ending": ".nii.gz",
        "annotation": "mip",
        "mip_axes": [0],
    }


def make_model(folds: tuple[int, ...] = (0, 1), trainer: str = "plain", labelset: str = "pseudo") -> Path:
    """A model folder with random-weight checkpoints (one seed per fold)."""
    plans = tiny_plans()
    model_dir = paths.results_root() / DATASET / f"{trainer}__{labelset}__3d_fullres"
    io.write_json(plans.to_json(), model_dir / "plans.json")
    io.write_json(dataset_json(), model_dir / "dataset.json")
    for fold in folds:
        torch.manual_seed(fold)
        network = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=True)
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": {},
            "epoch": 1,
            "trainer": trainer,
            "labelset": labelset,
            "fold": fold,
            "plans": plans.to_json(),
            "dataset_json": dataset_json(),
            "num_input_channels": 1,
            "num_classes": 2,
            "dropout": 0.0,
            "mirror_axes": [0, 1, 2],
            "logging": {},
        }
        save_checkpoint(checkpoint, model_dir / f"fold_{fold}" / "checkpoint_final.pt")
    return model_dir


def write_case(
    folder: Path, case_id: str, geometry: io.Geometry | None = None, shape=(12, 20, 24), seed=0
) -> Path:
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[1:-1, 2:-2, 2:-3] = rng.normal(100, 20, (shape[0] - 2, shape[1] - 4, shape[2] - 5))
    return io.write_image(image, geometry or io.Geometry.identity(), folder / f"{case_id}_0000.nii.gz")


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


# ----------------------------------------------------------------------------- sliding window


def nnunet_compute_steps(image_size, tile_size, tile_step_size):
    """nnU-Net v2's compute_steps_for_sliding_window, verbatim, as the reference."""
    target_step_sizes_in_voxels = [i * tile_step_size for i in tile_size]
    num_steps = [
        int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target_step_sizes_in_voxels, tile_size)
    ]
    steps = []
    for dim in range(len(tile_size)):
        max_step_value = image_size[dim] - tile_size[dim]
        actual_step_size = max_step_value / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
        steps.append([int(np.round(actual_step_size * i)) for i in range(num_steps[dim])])
    return steps


def test_steps_match_nnunet_formula() -> None:
    assert compute_steps((100, 128, 200), (64, 128, 128), 0.5) == [[0, 18, 36], [0], [0, 36, 72]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        tile = tuple(int(t) for t in rng.integers(4, 64, 3))
        size = tuple(t + int(e) for t, e in zip(tile, rng.integers(0, 150, 3)))
        step = float(rng.choice([0.25, 0.5, 0.7, 1.0]))
        assert compute_steps(size, tile, step) == nnunet_compute_steps(size, tile, step)


def test_gaussian_importance_map() -> None:
    gaussian = gaussian_importance_map((8, 16, 12)).numpy()
    assert gaussian.shape == (8, 16, 12)
    assert gaussian.max() == pytest.approx(10.0)
    assert np.unravel_index(gaussian.argmax(), gaussian.shape) == (4, 8, 6)
    assert gaussian.min() > 0
    assert gaussian[4, 8, 0] < gaussian[4, 8, 3] < gaussian[4, 8, 6]


def test_constant_network_gives_its_constant_map() -> None:
    constant = torch.tensor([0.25, -3.0, 7.5])

    def network(batch: torch.Tensor) -> torch.Tensor:
        return constant.view(1, 3, 1, 1, 1).expand(batch.shape[0], 3, *batch.shape[2:]).clone()

    image = np.random.default_rng(0).normal(size=(1, 13, 37, 21)).astype(np.float32)
    logits = sliding_window_logits(network, image, (8, 16, 16), 3, batch_size=3)
    assert logits.shape == (3, 13, 37, 21)
    torch.testing.assert_close(logits, constant.view(3, 1, 1, 1).expand_as(logits))


def test_pointwise_network_is_reproduced_exactly_with_mirroring_and_padding() -> None:
    # a voxel-wise network is equivariant: tiles, flips and padding must not change its output
    def network(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch, 2 * batch[:, :1] - batch[:, 1:]], dim=1)

    image = np.random.default_rng(1).normal(size=(2, 6, 40, 19)).astype(np.float32)  # z smaller than the tile
    logits = sliding_window_logits(network, image, (8, 16, 16), 3, mirror_axes=(0, 1, 2), batch_size=2)
    expected = network(torch.from_numpy(image)[None])[0]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert len(mirror_combinations((0, 1, 2))) == 8


# ----------------------------------------------------------------------------- inputs and parts


def test_discover_cases_reports_missing_channels(tmp_path: Path) -> None:
    for name in ("a_0000", "a_0001", "b_0000", "c_0001", "._a_0000", ".d_0000.partial-0000dead"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")  # the hidden ones are no cases
    cases = discover_cases([tmp_path], 2, ".nii.gz")
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    assert cases[0].problem is None and len(cases[0].files) == 2
    assert "b_0001.nii.gz" in cases[1].problem and "c_0000.nii.gz" in cases[2].problem
    with pytest.raises(InputError, match="no such folder"):
        discover_cases([tmp_path / "missing"], 1, ".nii.gz")
    listed = discover_cases([tmp_path / "a_0000.nii.gz", tmp_path / "gone.nii.gz"], 1, ".nii.gz")
    assert listed[1].case_id == "gone" and "file not found" in listed[1].problem


def test_parts_cover_every_case_once(tmp_path: Path) -> None:
    cases = discover_cases([tmp_path / f"case{i}_0000.nii.gz" for i in (3, 1, 4, 0, 2)], 1, ".nii.gz")
    parts = [select_part(cases, 2, k) for k in range(2)]
    ids = [c.case_id for part in parts for c in part]
    assert sorted(ids) == [f"case{i}" for i in range(5)] and len(set(ids)) == 5
    with pytest.raises(InputError):
        select_part(cases, 2, 2)


# ----------------------------------------------------------------------------- whole predictions


def test_output_has_exact_input_geometry(data_roots, tmp_path: Path) -> None:
    make_model(folds=(0,))
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [0, 0, -1], [np.sin(angle), np.cos(angle), 0]])
    geometry = io.Geometry((0.73, 1.31, 2.9), (-12.5, 33.125, 7.25), tuple(rotation.ravel()))
    write_case(tmp_path / "in", "case0", geometry)
    out = tmp_path / "out"
    assert run_cli(["-i", str(tmp_path / "in"), "-o", str(out), "-d", "990", "--disable-progress-bar"]) == 0
    written = sitk.ReadImage(str(out / "case0.nii.gz"))
    source = sitk.ReadImage(str(tmp_path / "in" / "case0_0000.nii.gz"))
    assert written.GetSize() == source.GetSize()
    assert written.GetSpacing() == source.GetSpacing()
    assert written.GetOrigin() == source.GetOrigin()
    assert written.GetDirection() == source.GetDirection()
    segmentation = sitk.GetArrayFromImage(written)
    assert set(np.unique(segmentation)) <= {0, 1}
    assert (segmentation[0] == 0).all()  # outside the nonzero box background has probability 1
    for name in ("plans.json", "dataset.json", "predict_args.json"):
        assert (out / name).is_file()


def test_two_fold_ensemble_is_mean_of_fold_probabilities(data_roots, tmp_path: Path) -> None:
    make_model(folds=(0, 1))
    write_case(tmp_path / "in", "case0", io.Geometry.identity((2.0, 0.8, 1.1)))
    probabilities = {}
    for name, folds in (("f0", ["0"]), ("f1", ["1"]), ("both", ["0", "1"])):
        out = tmp_path / name
        argv = ["-i", str(tmp_path / "in"), "-o", str(out), "-d", "990", "-f", *folds, "--save-probabilities"]
        assert run_cli([*argv, "--disable-progress-bar"]) == 0
        with np.load(out / "case0.npz") as npz:
            probabilities[name] = npz["probabilities"].astype(np.float32)
    assert probabilities["both"].shape == (2, 12, 20, 24)
    assert not np.allclose(probabilities["f0"], probabilities["f1"], atol=1e-3)  # the folds differ
    np.testing.assert_allclose(
        probabilities["both"], (probabilities["f0"] + probabilities["f1"]) / 2, atol=2e-3
    )
    np.testing.assert_allclose(probabilities["both"].sum(0), 1.0, atol=2e-3)
    predict_args = io.read_json(tmp_path / "both" / "predict_args.json")
    assert predict_args["folds_used"] == 2 and predict_args["mirror_axes"] == [0, 1, 2]


def test_predictor_from_python_matches_tta_free_path(data_roots) -> None:
    model_dir = make_model(folds=(0, 1))
    assert resolve_model_dir(990) == model_dir
    predictor = Predictor.from_model_folder(model_dir, use_mirroring=False, device="cpu")
    images = np.random.default_rng(2).normal(size=(1, 10, 18, 20)).astype(np.float32) + 5
    probabilities = predictor.predict_case(images, io.Geometry.identity((1.0, 1.0, 1.0)))
    assert probabilities.shape == (2, 10, 18, 20)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    per_fold = predictor.predict_fold_probabilities(images)  # identity spacing: same grid
    np.testing.assert_allclose(predictor.predict_preprocessed(images), np.mean(per_fold, axis=0), atol=1e-6)


def test_num_parts_over_two_calls_and_continue(data_roots, tmp_path: Path) -> None:
    make_model(folds=(0,))
    for i in range(5):
        write_case(tmp_path / "in", f"case{i}", seed=i)
    out = tmp_path / "out"
    base = [
        "-i",
        str(tmp_path / "in"),
        "-o",
        str(out),
        "-d",
        "990",
        "--disable-tta",
        "--disable-progress-bar",
    ]
    written = []
    for part in (0, 1):
        before = set(out.glob("*.nii.gz")) if out.exists() else set()
        assert run_cli([*base, "--num-parts", "2", "--part-id", str(part)]) == 0
        written.append(set(out.glob("*.nii.gz")) - before)
    assert written[0].isdisjoint(written[1])
    assert {p.name for p in written[0] | written[1]} == {f"case{i}.nii.gz" for i in range(5)}

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    (out / "case2.nii.gz").unlink()
    stale = out / ".case3.partial-deadbeef.nii.gz"  # what a killed writer would leave behind
    stale.write_bytes(b"half")
    outputs = predict_folder(
        tmp_path / "in", out, 990, settings=PredictionSettings(tta=False), resume=True, show_progress=False
    )
    assert len(outputs) == 5
    assert (out / "case2.nii.gz").is_file() and not stale.exists()
    for name, mtime in mtimes.items():
        if name != "case2.nii.gz":
            assert (out / name).stat().st_mtime_ns == mtime, name
    assert not list(out.glob(".*partial*"))


def test_bad_cases_are_reported_and_the_others_predicted(data_roots, tmp_path: Path, capsys) -> None:
    make_model(folds=(0,))
    folder = tmp_path / "in"
    write_case(folder, "good", seed=1)
    (folder / "broken_0000.nii.gz").write_bytes(b"not an image")
    write_case(folder, "lonely", seed=2).rename(folder / "lonely_0001.nii.gz")  # channel 0 missing
    out = tmp_path / "out"
    code = run_cli(
        ["-i", str(folder), "-o", str(out), "-d", "990", "--disable-tta", "--disable-progress-bar"]
    )
    assert code == 2
    assert (out / "good.nii.gz").is_file()
    assert not (out / "broken.nii.gz").exists() and not (out / "lonely.nii.gz").exists()
    err = capsys.readouterr().err
    assert "broken_0000.nii.gz" in err and "lonely_0000.nii.gz" in err


def test_model_selection_errors(data_roots, tmp_path: Path) -> None:
    write_case(tmp_path / "in", "case0")
    (data_roots["results"] / DATASET).mkdir()
    with pytest.raises(InputError, match="no trained model"):
        predict_folder(tmp_path / "in", tmp_path / "out", 990, show_progress=False)
    make_model(folds=(0,), labelset="pseudo")
    make_model(folds=(0,), labelset="dense")
    with pytest.raises(InputError, match="several label sets"):
        resolve_model_dir(990)
    make_model(folds=(0,), trainer="mip", labelset="pseudo")  # dataset.json says annotation "mip"
    assert resolve_model_dir(990).name == "mip__pseudo__3d_fullres"
    with pytest.raises(InputError, match="fold_3"):
        predict_folder(
            tmp_path / "in",
            tmp_path / "out",
            990,
            labels="dense",
            settings=PredictionSettings(folds=(3,), trainer="plain"),
        )


# ----------------------------------------------------------------------------- postprocessing, CLI


def test_remove_small_components_and_learned_size() -> None:
    segmentation = np.zeros((10, 10, 10), np.uint8)
    segmentation[1:4, 1:4, 1:4] = 1  # 27 voxels
    segmentation[7, 7, 7] = 1  # 1 voxel
    segmentation[6:8, 1:3, 1:3] = 1  # 8 voxels
    cleaned = remove_small_components(segmentation, 8)
    assert cleaned.sum() == 35 and cleaned[7, 7, 7] == 0
    label_map = segmentation.copy()
    label_map[7, 7, 7] = 2  # the ignore value is no component
    assert smallest_component_size([label_map], ignore_label=2) == 8


def test_postprocess_flag_removes_small_components(data_roots, tmp_path: Path) -> None:
    make_model(folds=(0,))
    write_case(tmp_path / "in", "case0")
    plain, cleaned = tmp_path / "plain", tmp_path / "cleaned"
    predict_folder(tmp_path / "in", plain, 990, settings=PredictionSettings(tta=False), show_progress=False)
    predict_folder(
        tmp_path / "in",
        cleaned,
        990,
        settings=PredictionSettings(tta=False, postprocess=True, min_component_size=50),
        show_progress=False,
    )
    before = io.read_image(plain / "case0.nii.gz")[0]
    after = io.read_image(cleaned / "case0.nii.gz")[0]
    np.testing.assert_array_equal(after, remove_small_components(before, 50))
    assert io.read_json(cleaned / "predict_args.json")["min_component_size"] == 50


def test_multi_value_options_are_expanded() -> None:
    argv = "-i a b -o out -d 900 -f 0 1 2 --continue".split()
    assert expand_multi_value_options(argv) == [
        *("-i", "a", "-i", "b", "-o", "out", "-d", "900"),
        *itertools.chain.from_iterable(("-f", f) for f in "012"),
        "--continue",
    ]


def test_next_case_is_preprocessed_while_the_current_one_is_predicted(
    data_roots, tmp_path, monkeypatch
) -> None:
    import time

    from mipseg.inference import predict_api

    make_model(folds=(0,))
    for i in range(3):
        write_case(tmp_path / "in", f"case{i}", seed=i)
    events: list[tuple[str, str, float]] = []
    load, predict = predict_api._load_and_preprocess, Predictor.predict_preprocessed

    def recorded_load(case, plans):
        events.append(("load", case.case_id, time.perf_counter()))
        return load(case, plans)

    def slow_predict(self, data, on_tiles_done=None):
        result = predict(self, data, on_tiles_done)
        time.sleep(0.3)  # a prediction that takes long enough to see the overlap
        events.append(("predicted", "", time.perf_counter()))
        return result

    monkeypatch.setattr(predict_api, "_load_and_preprocess", recorded_load)
    monkeypatch.setattr(Predictor, "predict_preprocessed", slow_predict)
    predict_folder(
        tmp_path / "in", tmp_path / "out", 990, settings=PredictionSettings(tta=False), show_progress=False
    )
    loads = {case: t for kind, case, t in events if kind == "load"}
    predicted = [t for kind, _, t in events if kind == "predicted"]
    assert loads["case1"] < predicted[0] and loads["case2"] < predicted[1]


def test_min_component_size_is_learned_from_validation_predictions(data_roots) -> None:
    from mipseg.inference.export import learned_min_component_size, min_size_from_validation

    reference = np.zeros((12, 20, 24), np.int16)
    reference[2:6, 2:6, 2:6] = 1  # a 64-voxel structure
    reference[10:, :, :] = 2  # ignored slab: a prediction there costs nothing
    prediction = (reference == 1).astype(np.int16)
    prediction[8, 10:13, 10] = 1  # a 3-voxel false positive: worth removing
    prediction[11, 5, 5] = 1  # inside the ignored slab
    best, dice = min_size_from_validation([(prediction, reference)], ignore_label=2)
    assert best == 4 and dice[1] < dice[4] == pytest.approx(1.0) and dice[128] == 0.0

    model_dir = make_model(folds=(0,))
    probabilities = np.stack([prediction == 0, prediction == 1]).astype(np.float16)
    (model_dir / "fold_0" / "validation.npz").write_bytes(b"")  # not in validation/: ignored
    (model_dir / "fold_0" / "validation").mkdir()
    np.savez_compressed(model_dir / "fold_0" / "validation" / "case0.npz", probabilities=probabilities)
    labelset_dir = data_roots["preprocessed"] / DATASET / "data" / "labelsets" / "pseudo"
    labelset_dir.mkdir(parents=True)
    np.save(labelset_dir / "case0.npy", reference[None])
    plans = tiny_plans()
    assert learned_min_component_size(model_dir, 990, "pseudo", plans, 2) == 4
    assert io.read_json(model_dir / "postprocessing.json")["min_component_size"] == 4


def test_default_folds_hold_the_chosen_checkpoint(tmp_path: Path) -> None:
    from mipseg.inference.predictor import find_folds

    for fold, kind in (("0", "final"), ("1", "final"), ("2", "latest"), ("all", "final")):
        (tmp_path / f"fold_{fold}").mkdir()
        (tmp_path / f"fold_{fold}" / f"checkpoint_{kind}.pt").write_bytes(b"")
    assert find_folds(tmp_path, "final") == ["0", "1"]
    assert find_folds(tmp_path, "latest") == ["2"]
    assert find_folds(tmp_path, "final", ["all", 1]) == ["all", "1"]
    with pytest.raises(InputError, match="fold_2"):
        find_folds(tmp_path, "final", [2])
    with pytest.raises(InputError, match="best"):
        find_folds(tmp_path, "best")


def test_a_failing_network_stops_the_tile_producer() -> None:
    import threading

    def network(batch: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")

    image = np.zeros((1, 20, 40, 40), np.float32)
    with pytest.raises(ValueError, match="boom"):
        sliding_window_logits(network, image, (8, 16, 16), 2, mirror_axes=None)
    assert not [t for t in threading.enumerate() if t.name == "mipseg-tiles"]


def test_min_component_size_without_validation_comes_from_the_label_maps_alone(data_roots) -> None:
    from mipseg.inference.export import learned_min_component_size

    model_dir = make_model(folds=(0,))  # no validation predictions: the label maps decide
    labelset = data_roots["preprocessed"] / DATASET / "labelsets" / "pseudo"
    label = np.zeros((12, 20, 24), np.uint8)
    label[2:6, 2:6, 2:6] = 1  # the smallest structure the model saw: 64 voxels
    label[8:12, 8:12, 8:12] = 1
    io.write_image(label, io.Geometry.identity(), labelset / "case0.nii.gz")
    seeds = np.full(label.shape, 2, np.uint8)
    seeds[3, 3, 3] = 1  # a seed map: single voxels, no structure
    io.write_image(seeds, io.Geometry.identity(), labelset / "case0_seeds.nii.gz")
    (labelset / ".case1.partial-0000dead.nii.gz").write_bytes(b"")  # a killed writer's temporary
    assert learned_min_component_size(model_dir, 990, "pseudo", tiny_plans(), 2) == 64
