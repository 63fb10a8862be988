"""mipseg_plan: fingerprint, plans, splits, preprocessing and its inverse, MIP files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mipseg import io
from mipseg.planning import planner
from mipseg.planning.mip import maximum_intensity_projection, window_to_uint8
from mipseg.planning.plans import load_plans
from mipseg.planning.preprocessing import preprocess_case, preprocess_labelset, revert_preprocessing
from mipseg.planning.topology import MIN_FEATURE_MAP_EDGE, get_pool_and_conv_props

SHAPE = (20, 32, 32)


def tiny_case(rng: np.random.RandomState, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A nonzero ellipsoid 'body' with zeros around it, a bright tube inside; and its dense label."""
    z, y, x = np.indices(shape)
    centre = [(s - 1) / 2 for s in shape]
    body = sum(((c - m) / (0.45 * s)) ** 2 for c, m, s in zip((z, y, x), centre, shape)) <= 1
    tube = ((y - centre[1] - rng.randint(-3, 4)) ** 2 + (x - centre[2]) ** 2 <= 4) & body
    image = np.where(body, 100 + 10 * rng.randn(*shape), 0).astype(np.float32)
    image[tube] += 200
    return image, tube.astype(np.uint8)


def write_dataset(
    raw: Path, dataset_id: int, spacing_zyx, num_cases=4, shape=SHAPE, channel="MR", annotation="mip"
) -> Path:
    """Raw dataset in mipseg format (mip mode, axis 0, no annotations yet) with labelsTr."""
    folder = raw / f"Dataset{dataset_id:03d}_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.RandomState(dataset_id)
    geometry = io.Geometry(
        tuple(float(s) for s in spacing_zyx[::-1]), (3.0, -2.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    for i in range(num_cases):
        image, label = tiny_case(rng, shape)
        io.write_image(image, geometry, folder / "imagesTr" / f"case{i:02d}_0000.nii.gz")
        io.write_image(label, geometry, folder / "labelsTr" / f"case{i:02d}.nii.gz")
    spec = {
        "channel_names": {"0": channel},
        "labels": {"background": 0, "vessel": 1},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    if annotation:
        spec |= {"annotation": annotation, "mip_axes": [0]}
    io.write_json(spec, folder / "dataset.json")
    return folder


def fingerprint_for(spacings, shapes, relative=1.0):
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "median_relative_size_after_cropping": relative,
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0}},
    }


class Spec:
    """The DatasetSpec attributes the planner reads."""

    def __init__(self, annotation=None, mip_axes=(0,), channel="MR"):
        self.channel_names = {"0": channel}
        self.labels = {"background": 0, "vessel": 1}
        self.num_classes = 2
        self.ignore_label = 2
        self.annotation = annotation
        self.mip_axes = mip_axes


def assert_pooling_respects_min_feature_map(plans):
    size = np.asarray(plans.patch_size)
    for stride in plans.network.strides:
        size = size // np.asarray(stride)
        assert np.all(size >= MIN_FEATURE_MAP_EDGE), (plans.patch_size, plans.network.strides)
    assert np.all(np.asarray(plans.patch_size) % np.asarray(plans.network.divisibility) == 0)


def test_target_spacing_anisotropic_and_isotropic():
    spacings = np.array([[5.0, 0.8, 0.8], [4.0, 0.8, 0.8], [3.6, 0.7, 0.7], [4.4, 0.8, 0.8], [6.0, 0.8, 0.8]])
    shapes = np.array([[30, 256, 256]] * 5)
    spacing, anisotropic = planner.target_spacing(spacings, shapes)
    # coarse axis > 3x others and < 1/3 of their voxels: 10th percentile of z spacings
    assert anisotropic
    assert spacing == pytest.approx([np.percentile(spacings[:, 0], 10), 0.8, 0.8])
    iso = np.array([[1.0, 1.0, 1.0], [1.2, 1.0, 1.0], [0.8, 1.0, 1.0]])
    spacing, anisotropic = planner.target_spacing(iso, np.array([[64, 96, 96]] * 3))
    assert not anisotropic and spacing == pytest.approx([1.0, 1.0, 1.0])


def test_anisotropic_plan_resamples_coarse_axis_to_10th_percentile():
    spacings = [[z, 0.8, 0.8] for z in (4.0, 4.5, 5.0, 5.0, 6.0)]
    plans = planner.plan_experiment(
        fingerprint_for(spacings, [[16, 128, 128]] * 5), Spec(), "D", planner.gpu_budget(8)
    )
    z_target = float(np.percentile([4.0, 4.5, 5.0, 5.0, 6.0], 10))  # 4.2 mm
    assert plans.spacing == pytest.approx([z_target, 0.8, 0.8])
    assert plans.notes and "anisotropic" in plans.notes[0]
    # z is > 2x coarser than y/x: in-plane pooling first, 1x3x3 kernels until spacings meet
    assert plans.network.strides[1] == [1, 2, 2] and plans.network.kernel_sizes[0] == [1, 3, 3]
    assert plans.batch_size >= 2
    assert_pooling_respects_min_feature_map(plans)


def test_pool_and_conv_props_anisotropic_by_hand():
    # spacing (4, 1, 1): z is not pooled until y/x spacing reaches 2 (after two pools), kernels 1 in z first
    plan = get_pool_and_conv_props([4.0, 1.0, 1.0], [24, 160, 160])
    assert plan.strides[:4] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert plan.kernel_sizes[0] == [1, 3, 3] and plan.kernel_sizes[2] == [3, 3, 3]
    assert plan.kernel_sizes[-1] == [3, 3, 3]


def test_gpu_plans_anisotropic_and_isotropic_match_hand_checked_values():
    aniso = planner.plan_experiment(
        fingerprint_for([[4.0, 1.0, 1.0]] * 4, [[20, 32, 32]] * 4, relative=0.6),
        Spec(),
        "Dataset001_A",
        planner.gpu_budget(8),
    )
    # (4,1,1) is > 3x but z has 20 voxels, not < 32/3: nnU-Net keeps the median spacing
    assert aniso.spacing == pytest.approx([4.0, 1.0, 1.0])
    assert aniso.patch_size == [20, 32, 32]  # clipped to the median shape; tiny volume fits the budget
    assert aniso.network.strides[1] == [1, 2, 2]  # z is 4x coarser: pooled in-plane first
    assert aniso.use_mask_for_norm == [True] and aniso.normalization == ["ZScore"]
    assert aniso.batch_size >= 2
    assert_pooling_respects_min_feature_map(aniso)

    iso = planner.plan_experiment(
        fingerprint_for([[1.0, 1.0, 1.0]] * 100, [[64, 96, 96]] * 100),
        Spec(channel="ct"),
        "Dataset002_I",
        planner.gpu_budget(8),
    )
    assert iso.spacing == [1.0, 1.0, 1.0]
    assert iso.normalization == ["CT"] and iso.use_mask_for_norm == [False]
    # by hand: 256^3 clipped to 64x96x96 fits (estimate 1.27e8 < 5.6e8); z pools 4x (64 -> 4), y/x 4x
    # (96 -> 6); batch round(5.6e8 / 1.27e8 * 2) = 9, capped by 5 % of 100 cases: 5
    assert iso.patch_size == [64, 96, 96]
    assert iso.network.features_per_stage == [32, 64, 128, 256, 320]
    assert iso.budget["estimate"] == 126_777_600
    assert iso.batch_size == 5
    big = planner.plan_experiment(
        fingerprint_for([[1.0, 1.0, 1.0]] * 10, [[128, 256, 256]] * 10), Spec(), "D", planner.gpu_budget(8)
    )
    assert big.budget["estimate"] <= 560e6 and big.batch_size == 2
    assert_pooling_respects_min_feature_map(big)
    assert_pooling_respects_min_feature_map(iso)


def test_cpu_plan_is_smaller_and_mip_patch_spans_projection_axis():
    fingerprint = fingerprint_for([[1.0, 1.0, 1.0]] * 5, [[64, 96, 96]] * 5)
    gpu = planner.plan_experiment(fingerprint, Spec(), "D", planner.gpu_budget(8))
    cpu = planner.plan_experiment(fingerprint, Spec(), "D", planner.CPU_BUDGET)
    assert gpu.patch_size == [64, 96, 96] and gpu.batch_size == 2
    assert cpu.budget["kind"] == "cpu" and cpu.batch_size >= 2
    assert cpu.budget["estimate_times_batch"] <= planner.CPU_REFERENCE_VALUE
    assert cpu.network.num_stages >= 4 and cpu.network.features_per_stage[0] == 16
    assert_pooling_respects_min_feature_map(cpu)
    mip = planner.plan_experiment(fingerprint, Spec(annotation="mip", mip_axes=(0,)), "D", planner.CPU_BUDGET)
    assert mip.mip_axes == [0] and mip.patch_size[0] >= 64  # whole rays along z
    assert mip.budget["estimate_times_batch"] <= planner.CPU_REFERENCE_VALUE
    assert_pooling_respects_min_feature_map(mip)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (4.0, 1.0, 1.0)])
def test_preprocess_then_revert_returns_original_geometry(spacing):
    image, label = tiny_case(np.random.RandomState(0))
    images = image[None]
    plans = planner.plan_experiment(
        fingerprint_for([list(spacing)], [list(SHAPE)]), Spec(), "D", planner.CPU_BUDGET
    )
    plans.spacing = [spacing[0] / 2, 0.8, 0.8]  # force a real resampling both ways
    geometry = io.Geometry.identity(spacing)
    data, seg, properties = preprocess_case(images, geometry, plans, label=label)
    assert data.dtype == np.float32 and seg.dtype == np.int16 and data.shape[1:] == seg.shape[1:]
    assert list(data.shape[1:]) == properties["shape_after_resampling"]
    bbox = properties["bbox"]
    assert properties["shape_before_cropping"] == list(SHAPE) and bbox[1][0] > 0  # zeros were cropped
    body = data[0][seg[0] == 0]
    assert abs(body.mean()) < 1.0  # normalized
    probabilities = np.stack([seg[0] == 0, seg[0] == 1]).astype(np.float32)
    back = revert_preprocessing(probabilities, properties, plans)
    assert back.shape == (2, *SHAPE)
    assert np.allclose(back.sum(axis=0), 1.0, atol=1e-4)
    outside = np.ones(SHAPE, bool)
    outside[tuple(slice(a, b) for a, b in bbox)] = False
    assert np.all(back[0][outside] == 1.0)
    recovered = back.argmax(axis=0)
    dice = 2 * np.sum((recovered == 1) & (label == 1)) / (np.sum(recovered == 1) + np.sum(label == 1))
    assert dice > 0.85


def test_plan_and_preprocess_end_to_end(data_roots):
    from mipseg.planning.plan_api import plan_and_preprocess

    write_dataset(data_roots["raw"], 901, (4.0, 1.0, 1.0), num_cases=4)
    plans = plan_and_preprocess(901, num_processes=1, device="cpu")
    out = data_roots["preprocessed"] / "Dataset901_Tiny"
    for name in ("dataset.json", "fingerprint.json", "plans.json", "splits.json"):
        assert (out / name).is_file()
    assert load_plans(out / "plans.json") == plans
    fingerprint = io.read_json(out / "fingerprint.json")
    assert fingerprint["foreground"] == "nonzero"  # mip mode, nothing annotated: the body
    assert fingerprint["spacings"] == [[4.0, 1.0, 1.0]] * 4
    splits = io.read_json(out / "splits.json")
    assert len(splits) == 4 and sorted(sum((s["val"] for s in splits), [])) == [
        f"case{i:02d}" for i in range(4)
    ]

    image, geometry = io.read_image(data_roots["raw"] / "Dataset901_Tiny/imagesTr/case01_0000.nii.gz")
    mip, depth = maximum_intensity_projection(image, 0)
    assert np.array_equal(np.load(out / "mips/case01_mip0_depth.npy"), image.argmax(axis=0))
    assert np.array_equal(io.read_png(out / "mips/case01_mip0.png"), window_to_uint8(image.max(axis=0)))
    assert (out / "mips/case01_mips.png").is_file()

    data = np.load(out / "data/case01.npy")
    properties = io.read_json(out / "data/case01.json")
    assert io.Geometry.from_dict(properties["geometry"]).matches(geometry)
    assert data.shape[1:] == tuple(properties["shape_after_resampling"])
    seg = np.load(out / "data/labelsets/dense/case01.npy")  # labelsTr preprocessed automatically
    assert seg.shape == (1, *data.shape[1:]) and seg.dtype == np.int16
    locations = np.load(out / "data/labelsets/dense/case01_locations.npz")
    assert np.all(seg[0][tuple(locations["1"].T)] == 1)

    # a weak label set with the ignore value: it survives resampling, and --continue skips done cases
    labelset = out / "labelsets/pseudo"
    labelset.mkdir(parents=True)
    label, label_geometry = io.read_image(data_roots["raw"] / "Dataset901_Tiny/labelsTr/case01.nii.gz")
    weak = np.where(label == 1, 1, 2).astype(np.uint8)
    weak[:, :, :10] = 0
    io.write_image(weak, label_geometry, labelset / "case01.nii.gz")
    preprocess_labelset(901, "pseudo", num_processes=1)
    pseudo = np.load(out / "data/labelsets/pseudo/case01.npy")
    assert set(np.unique(pseudo)) == {0, 1, 2}
    assert "annotated" in np.load(out / "data/labelsets/pseudo/case01_locations.npz")
    before = (out / "data/case02.npy").stat().st_mtime_ns
    # a producer's run in progress stages its set in labelsets/.{name}.next: not a label set to copy
    staged = out / "labelsets/.pseudo.next"
    staged.mkdir()
    io.write_image(weak, label_geometry, staged / "case01.nii.gz")
    plan_and_preprocess(901, num_processes=1, device="cpu", resume=True)
    assert (out / "data/case02.npy").stat().st_mtime_ns == before
    assert sorted(p.name for p in (out / "data/labelsets").iterdir()) == ["dense", "pseudo"]


def test_bad_labelset_is_reported(data_roots):
    from mipseg.errors import InputError
    from mipseg.planning.plan_api import plan_and_preprocess

    write_dataset(data_roots["raw"], 902, (1.0, 1.0, 1.0), num_cases=2)
    plan_and_preprocess(902, num_processes=1, device="cpu")
    labelset = data_roots["preprocessed"] / "Dataset902_Tiny/labelsets/bad"
    labelset.mkdir(parents=True)
    io.write_image(np.full((20, 32, 30), 1, np.uint8), io.Geometry.identity(), labelset / "case00.nii.gz")
    with pytest.raises(InputError, match="case00.nii.gz"):
        preprocess_labelset(902, "bad", num_processes=1)


def test_fingerprint_uses_annotation_seeds_once_annotated(data_roots):
    from mipseg.planning.plan_api import plan_and_preprocess

    folder = write_dataset(data_roots["raw"], 903, (1.0, 1.0, 1.0), num_cases=2)
    (folder / "annotationsTr").mkdir()
    expected = []
    for i in range(2):
        image, _ = io.read_image(folder / f"imagesTr/case{i:02d}_0000.nii.gz")
        label, _ = io.read_image(folder / f"labelsTr/case{i:02d}.nii.gz")
        drawn = label.max(axis=0) > 0
        io.write_png(drawn.astype(np.uint8) * 255, folder / f"annotationsTr/case{i:02d}_mip0.png")
        expected.append(image.max(axis=0)[drawn])
    plan_and_preprocess(903, num_processes=1, device="cpu", preprocess=False)
    fingerprint = io.read_json(data_roots["preprocessed"] / "Dataset903_Tiny/fingerprint.json")
    assert fingerprint["foreground"] == "annotations"
    for statistics, values in zip(fingerprint["intensity_properties_per_case"], expected):
        assert statistics[0]["mean"] == pytest.approx(float(values.mean()), rel=1e-5)
        assert statistics[0]["max"] == pytest.approx(float(values.max()))
    assert not (data_roots["preprocessed"] / "Dataset903_Tiny/data").exists()  # --no-preprocess


def test_cli_prints_plan_and_reports_bad_input(data_roots):
    from typer.testing import CliRunner

    from mipseg.cli.plan import app

    write_dataset(data_roots["raw"], 904, (1.0, 1.0, 1.0), num_cases=2)
    runner = CliRunner()
    result = runner.invoke(app, ["-d", "904", "-np", "1", "--device", "cpu", "--no-preprocess"])
    assert result.exit_code == 0, result.output
    assert "patch size" in result.output and "cpu" in result.output
    result = runner.invoke(app, ["-d", "905"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["-d", "904", "--device", "tpu"])
    assert result.exit_code == 2 and "--device" in result.output


def test_normalization_ct_and_masked_zscore():
    from mipseg.planning.preprocessing import normalize

    plans = planner.plan_experiment(
        fingerprint_for([[1.0] * 3], [list(SHAPE)]), Spec(), "D", planner.CPU_BUDGET
    )
    plans.normalization, plans.use_mask_for_norm = ["CT", "ZScore"], [False, True]
    plans.intensity_properties = {
        "0": {"mean": 50.0, "std": 25.0, "percentile_00_5": 0.0, "percentile_99_5": 100.0},
        "1": {},
    }
    images = np.stack([np.array([-500.0, 0.0, 50.0, 1000.0]), np.array([0.0, 2.0, 4.0, 6.0])]).reshape(
        2, 1, 1, 4
    )
    mask = np.array([False, True, True, True]).reshape(1, 1, 4)
    result = normalize(images, mask, plans)
    assert result[0].ravel() == pytest.approx([-2.0, -2.0, 0.0, 2.0])  # clipped to [0, 100], (x - 50) / 25
    inside = np.array([2.0, 4.0, 6.0])
    assert result[1].ravel() == pytest.approx([0.0, *((inside - inside.mean()) / inside.std())])


def test_dense_dataset_fingerprint_uses_labels(data_roots):
    from mipseg.planning.plan_api import plan_and_preprocess

    folder = write_dataset(
        data_roots["raw"], 907, (1.0, 1.0, 1.0), num_cases=2, channel="CT", annotation=None
    )
    plans = plan_and_preprocess(907, num_processes=1, device="cpu", preprocess=False)
    fingerprint = io.read_json(data_roots["preprocessed"] / "Dataset907_Tiny/fingerprint.json")
    assert fingerprint["foreground"] == "labels" and plans.normalization == ["CT"]
    values = []
    for i in range(2):
        image, _ = io.read_image(folder / f"imagesTr/case{i:02d}_0000.nii.gz")
        label, _ = io.read_image(folder / f"labelsTr/case{i:02d}.nii.gz")
        values.append(image[label > 0])
    assert fingerprint["intensity_properties_per_case"][1][0]["mean"] == pytest.approx(
        float(values[1].mean())
    )
    pooled = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert min(v.min() for v in values) <= pooled["percentile_00_5"] <= pooled["percentile_99_5"]
    assert pooled["max"] <= max(v.max() for v in values)
    assert (data_roots["preprocessed"] / "Dataset907_Tiny/mips/case00_mip2.png").is_file()  # review: all axes


def test_continue_removes_mip_temporaries_a_killed_run_left(data_roots):
    from mipseg.planning.plan_api import plan_and_preprocess

    write_dataset(data_roots["raw"], 908, (1.0, 1.0, 1.0), num_cases=2)
    plan_and_preprocess(908, num_processes=1, device="cpu", preprocess=False)
    mips = data_roots["preprocessed"] / "Dataset908_Tiny" / "mips"
    (mips / "case01_mips.png").unlink()  # a kill before the side-by-side: case01 counts as unfinished
    planted = [mips / ".case01_mips.partial-0000dead.png", mips / ".case01_mip0_depth.partial-0000dead.npy"]
    for path in planted:
        path.write_bytes(b"half")
    unrelated = mips / ".notes.partial-0000dead.txt"  # not a file mipseg_plan writes: kept
    unrelated.write_bytes(b"mine")
    plan_and_preprocess(908, num_processes=1, device="cpu", preprocess=False, resume=True)
    assert (mips / "case01_mips.png").is_file()
    assert not any(path.exists() for path in planted) and unrelated.is_file()
