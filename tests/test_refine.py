"""mipseg_refine: the refinement rules on synthetic arrays, and the stage end to end on a tiny dataset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _training_helpers import tiny_plans, write_tiny_dataset
from scipy import ndimage
from typer.testing import CliRunner

from mipseg import io, labelset
from mipseg.cli.refine import app
from mipseg.errors import InputError
from mipseg.refine import rules as refine
from mipseg.refine.refine_api import RefineSettings, refine_labelset

torch.set_num_threads(1)
IGNORE = 2


def _probabilities(foreground: np.ndarray, rng: np.random.Generator, confidence: float = 0.9) -> np.ndarray:
    """(2, ...) softmax saying ``foreground`` with roughly ``confidence``, with a little noise."""
    p = np.where(foreground, confidence, 1 - confidence) + rng.normal(0, 0.05, foreground.shape)
    p = np.clip(p, 0.01, 0.99).astype(np.float32)
    return np.stack([1 - p, p])


def _corrupted_case(rng: np.random.Generator):
    """Truth: a slab of foreground; labels: all labelled, truth's foreground block (8x8x8) set to 0."""
    truth = np.zeros((24, 32, 32), dtype=np.uint8)
    truth[4:20, 8:24, 8:16] = 1
    corrupted = np.zeros_like(truth, dtype=bool)
    corrupted[6:14, 10:18, 8:16] = True
    labels = truth.copy()
    labels[corrupted] = 0
    return truth, labels, corrupted


@pytest.mark.parametrize("method", refine.CL_METHODS)
def test_confident_learning_flips_corrupted_block_back_and_keeps_correct_labels(method) -> None:
    rng = np.random.default_rng(0)
    truth, labels, corrupted = _corrupted_case(rng)
    probabilities = _probabilities(truth == 1, rng).reshape(2, -1)
    issues = refine.confident_learning_issues(probabilities, labels.ravel(), method=method)
    cleaned = refine.flip_issues(labels.ravel(), issues, probabilities).reshape(truth.shape)
    fixed = (cleaned == truth)[corrupted].mean()
    broken = (cleaned != truth)[~corrupted].mean()
    assert fixed > 0.75, f"only {fixed:.2%} of the corrupted voxels were flipped back"
    assert broken < 0.005, f"{broken:.2%} of the correct labels were flipped"


def test_vectorized_confident_joint_matches_cleanlab_on_three_classes() -> None:
    rng = np.random.default_rng(1)
    n, k = 20000, 3
    truth = rng.choice(k, n, p=[0.8, 0.1, 0.1])
    logits = rng.normal(0, 1, (k, n))
    logits[truth, np.arange(n)] += 2.5
    probabilities = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    labels = truth.copy()
    noisy = rng.random(n) < 0.08
    labels[noisy] = rng.integers(0, k, noisy.sum())
    ours = refine.confident_learning_issues(probabilities, labels, method="confident_joint")
    theirs = refine.confident_learning_issues(probabilities, labels, method="cleanlab")
    assert ours.sum() > 100
    np.testing.assert_array_equal(ours, theirs)


def test_uncertainty_adds_foreground_only_near_s1_and_only_where_unlabelled() -> None:
    rng = np.random.default_rng(2)
    shape = (20, 40, 40)
    vessel = np.zeros(shape, dtype=bool)
    vessel[:, 18:22, 5:35] = True  # a bar the model confidently calls foreground
    labels = np.full(shape, IGNORE, dtype=np.uint8)
    labels[8:12, 19:21, 5:12] = 1  # S_1 covers only one end of the bar
    labels[:, :5, :] = 0
    deterministic = _probabilities(vessel, rng, 0.95)
    stochastic = np.stack([_probabilities(vessel, rng, 0.95) for _ in range(4)])
    add_fg, add_bg = refine.uncertainty_candidates(
        deterministic, stochastic, labels, IGNORE, max_distance=4.0
    )
    added = add_fg > 0
    assert added.any() and add_bg.any()
    distance = ndimage.distance_transform_edt(labels != 1)
    assert distance[added].max() <= 4.0, "foreground added farther than max_distance from S_1"
    assert not (added & (labels != IGNORE)).any() and not (add_bg & (labels != IGNORE)).any()
    assert not (added & ~vessel).any() and not (add_bg & vessel).any()
    # background: only the most certain ~45 % of the agreeing unlabelled candidates
    candidates = (labels == IGNORE) & ~vessel
    assert 0.35 < add_bg.sum() / candidates.sum() < 0.55
    # nothing is added where the deterministic and the stochastic predictions disagree
    flipped = stochastic.copy()
    flipped[:, :, :, :, 20:] = flipped[:, ::-1, :, :, 20:]
    add_fg2, add_bg2 = refine.uncertainty_candidates(deterministic, flipped, labels, IGNORE)
    assert not add_fg2[..., 20:].any() and not add_bg2[..., 20:].any()


def test_top_fraction_entropy_and_distance_helpers() -> None:
    values = np.arange(100, dtype=np.float32)
    assert refine.top_fraction(values, 0.75).sum() == 75 and refine.top_fraction(values, 0.75)[99]
    assert refine.top_fraction(values, 0).sum() == 0 and refine.top_fraction(values, 1).all()
    entropy = refine.normalized_entropy(np.array([[1.0, 0.5], [0.0, 0.5]]))
    np.testing.assert_allclose(entropy, [0.0, 1.0], atol=1e-5)
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[4, 4, 4] = True
    distance = refine.distance_to_mask(mask, 2.0, spacing=(2.0, 1.0, 1.0))
    assert distance[4, 4, 7] == pytest.approx(3.0) and distance[5, 4, 4] == pytest.approx(2.0)
    assert np.isinf(refine.distance_to_mask(np.zeros((3, 3, 3), bool), 2.0)).all()


def test_flips_to_foreground_far_from_s1_are_undone() -> None:
    before = np.zeros((1, 1, 20), dtype=np.uint8)
    before[..., 0] = 1
    after = before.copy()
    after[..., [3, 4, 5, 12]] = 1  # distances 3, 4, 5, 12 from S_1
    after[..., 0] = 0  # a foreground -> background flip is always allowed
    kept = refine.keep_foreground_near(before, after, max_distance=4.0)
    assert np.flatnonzero(kept[0, 0] == 1).tolist() == [3, 4] and kept[0, 0, 0] == 0


def test_merge_cleans_labelled_adds_unlabelled_conflicts_become_ignore_seeds_stay() -> None:
    labels = np.array([0, 1, 1, IGNORE, IGNORE, IGNORE, IGNORE, 0], dtype=np.uint8)
    cleaned = np.array([1, 0, 1, IGNORE, IGNORE, IGNORE, IGNORE, 0], dtype=np.uint8)
    add_fg = np.array([0, 0, 0, 1, 0, 1, 0, 0], dtype=np.uint8)
    add_bg = np.array([0, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    seeds = np.array([IGNORE, 1, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE], dtype=np.uint8)
    merged = refine.merge_refinement(labels, cleaned, add_fg, add_bg, ignore_label=IGNORE, seeds=seeds)
    # flipped 0->1 | seed stays 1 | kept | added fg | added bg | claimed by both | nothing | agreeing bg
    np.testing.assert_array_equal(merged, [1, 1, 1, 1, 0, IGNORE, IGNORE, 0])
    counts = refine.change_counts(labels, merged, IGNORE, [0, 1])
    assert counts["flipped"] == {"0->1": 1, "1->0": 0}
    assert counts["added"] == {"0": 1, "1": 1} and counts["removed"] == {"0": 0, "1": 0}
    agreement = labelset.agreement(merged, np.array([1, 1, 1, 1, 0, 0, 0, 1]), {"background": 0, "vessel": 1})
    assert agreement["vessel"]["precision"] == 1.0 and agreement["vessel"]["recall"] == pytest.approx(4 / 5)


def _train_two_folds(data_roots, dropout: float = 0.3) -> str:
    from mipseg.training.loop import TrainingConfig
    from mipseg.training.train_api import train_fold

    resampling = {"data_order": 3, "data_order_z": 0, "seg_order": 1, "seg_order_z": 0}
    resampling.update(probabilities_order=1, probabilities_order_z=0, separate_z_anisotropy_threshold=3.0)
    plans = dataclasses.replace(tiny_plans(patch_size=(16, 32, 32)), resampling=resampling)
    name = write_tiny_dataset(data_roots, num_cases=4, seeds=True, plans=plans)
    cases = [f"case_{i:03d}" for i in range(4)]
    splits = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    io.write_json(splits, data_roots["preprocessed"] / name / "splits.json")
    config = TrainingConfig(
        epochs=1, iters_per_epoch=2, val_iters=1, num_workers=0, device="cpu", dropout=dropout
    )
    for fold in (0, 1):
        train_fold(name, fold, config=config, show_progress=False)
    return name


def test_stage_writes_a_valid_label_set_report_and_resumes(data_roots) -> None:
    name = _train_two_folds(data_roots)
    settings = RefineSettings(passes=2)
    source = data_roots["preprocessed"] / name / "labelsets" / "pseudo"
    # a class the source's drawings left out of a case stays recorded in the refined set
    source_report = io.read_json(source / "report.json") if (source / "report.json").is_file() else {}
    source_report.setdefault("cases", {}).setdefault("case_002", {})["undrawn_classes"] = [1]
    io.write_json(source_report, source / "report.json")
    folder = refine_labelset(name, "pseudo", "refined", settings=settings, device="cpu", show_progress=False)
    report = io.read_json(folder / "report.json")
    assert [c for c, entry in report["cases"].items() if "undrawn_classes" in entry] == ["case_002"]
    assert report["cases"]["case_002"]["undrawn_classes"] == [1]
    assert sorted(report["cases"]) == [f"case_{i:03d}" for i in range(4)]
    assert report["warnings"] == []
    for case_id, entry in report["cases"].items():
        refined, geometry = io.read_image(folder / f"{case_id}.nii.gz")
        before, source_geometry = io.read_image(source / f"{case_id}.nii.gz")
        assert refined.shape == before.shape and geometry.matches(source_geometry)
        assert set(np.unique(refined).tolist()) <= {0, 1, IGNORE}
        seeds, _ = io.read_image(folder / f"{case_id}_seeds.nii.gz")
        assert (refined[seeds == 1] == 1).all()
        # foreground never appears far from the source label set's foreground
        new_foreground = (refined == 1) & (before != 1)
        if new_foreground.any():
            assert ndimage.distance_transform_edt(before != 1)[new_foreground].max() <= 4.0
        assert entry["fold"] == (0 if case_id in ("case_000", "case_001") else 1)
        assert set(entry["agreement"]) == {"background", "vessel"}
    description = io.read_json(folder / "labelset.json")
    assert description["made_from"]["labelset"] == "pseudo" and description["ignore"] == IGNORE
    # --continue keeps finished cases (their files are not rewritten)
    stamp = (folder / "case_000.nii.gz").stat().st_mtime_ns
    refine_labelset(name, settings=settings, device="cpu", resume=True, show_progress=False)
    assert (folder / "case_000.nii.gz").stat().st_mtime_ns == stamp
    # the refined set preprocesses and trains (fine-tuning from the fold's model); in-process here
    from mipseg.planning.preprocessing import preprocess_labelset
    from mipseg.training.loop import TrainingConfig
    from mipseg.training.train_api import train_fold

    preprocess_labelset(name, "refined", num_processes=1)

    init = data_roots["results"] / name / "plain__pseudo__3d_fullres" / "fold_0" / "checkpoint_final.pt"
    config = TrainingConfig(epochs=1, iters_per_epoch=1, val_iters=1, num_workers=0, device="cpu")
    fold_dir = train_fold(name, 0, labels="refined", config=config, init_from=init, show_progress=False)
    assert (fold_dir / "checkpoint_final.pt").is_file()
    # refining again invalidates the preprocessed copies the fine-tuning made; a fold model without
    # dropout gives a warning (recorded in the report), not an error
    preprocessed_copy = data_roots["preprocessed"] / name / "data" / "labelsets" / "refined" / "case_000.npy"
    assert preprocessed_copy.is_file()
    fold_1 = data_roots["results"] / name / "plain__pseudo__3d_fullres" / "fold_1" / "checkpoint_final.pt"
    checkpoint = torch.load(fold_1, weights_only=False)
    torch.save({**checkpoint, "dropout": 0.0}, fold_1)
    refine_labelset(name, settings=RefineSettings(passes=1), device="cpu", show_progress=False)
    assert not preprocessed_copy.exists()
    warnings = io.read_json(folder / "report.json")["warnings"]
    assert len(warnings) == 1 and "fold 1" in warnings[0] and "without dropout" in warnings[0]


def test_missing_fold_model_and_bad_settings_are_input_errors(data_roots) -> None:
    name = write_tiny_dataset(data_roots, num_cases=4, seeds=False)
    with pytest.raises(InputError) as error:
        refine_labelset(name, device="cpu", show_progress=False)
    assert any("has no trained model" in p and "mipseg_train" in p for p in error.value.problems)
    with pytest.raises(InputError) as error:
        refine_labelset(name, settings=RefineSettings(fg_top=1.5, cl_method="x"), show_progress=False)
    assert len(error.value.problems) == 2
    result = CliRunner().invoke(app, ["-d", name, "--name", "pseudo"])
    assert result.exit_code == 2 and "--name" in result.output


def test_probabilities_go_back_to_the_raw_grid_with_and_without_resampling() -> None:
    from mipseg.planning.preprocessing import revert_preprocessing

    resampling = {"data_order": 3, "data_order_z": 0, "seg_order": 1, "seg_order_z": 0}
    resampling.update(probabilities_order=1, probabilities_order_z=0, separate_z_anisotropy_threshold=3.0)
    plans = dataclasses.replace(tiny_plans(), spacing=[2.0, 2.0, 2.0], resampling=resampling)
    properties = {
        "shape_before_cropping": [20, 24, 24],
        "bbox": [[2, 18], [2, 22], [4, 24]],
        "shape_after_cropping": [16, 20, 20],
        "original_spacing": [1.0, 1.0, 1.0],
    }
    foreground = np.zeros((8, 10, 10), dtype=np.float32)
    foreground[2:6, 3:7, 3:7] = 1
    raw = revert_preprocessing(np.stack([1 - foreground, foreground]), properties, plans)
    assert raw.shape == (2, 20, 24, 24)
    assert raw[0, :2].min() == 1 and raw[1, :, :, :4].max() == 0  # outside the crop box: background
    assert raw[1, 2 + 8, 2 + 10, 4 + 10] > 0.9 and np.allclose(raw.sum(0), 1, atol=1e-4)
    same = dataclasses.replace(plans, spacing=[1.0, 1.0, 1.0])
    pasted = revert_preprocessing(
        np.stack([1 - foreground, foreground]),
        {**properties, "shape_after_cropping": [8, 10, 10], "bbox": [[0, 8], [0, 10], [0, 10]]},
        same,
    )
    assert pasted.shape == (2, 20, 24, 24) and pasted[1, 3, 4, 4] == 1 and pasted[0, 10:].min() == 1
