"""find_best_configuration: the documented ranking rule, and postprocessing rules for vessels vs organs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mipseg import io
from mipseg.cli.find_best_configuration import main as find_main
from mipseg.inference.postprocessing import apply_rules
from mipseg.selection.postprocessing_search import decide_postprocessing
from mipseg.selection.selection_api import find_best_configuration

DATASET = "Dataset990_Tiny"
LABELS = {"background": 0, "vessel": 1, "ignore": 2}
SHAPE = (8, 16, 16)


def _model(results: Path, name: str, vessel_probability: dict[str, np.ndarray]) -> Path:
    """A model folder whose out-of-fold predictions are the given vessel probabilities (case -> map)."""
    from _training_helpers import tiny_plans

    folder = results / DATASET / name
    tiny_plans().save(folder / "plans.json")
    io.write_json(
        {"channel_names": {"0": "MRA"}, "labels": LABELS, "file_ending": ".nii.gz", "annotation": "mip"},
        folder / "dataset.json",
    )
    for fold, (case, vessel) in enumerate(sorted(vessel_probability.items())):
        probabilities = np.stack([1 - vessel, vessel]).astype(np.float16)
        target = folder / f"fold_{fold}" / "validation" / f"{case}.npz"
        target.parent.mkdir(parents=True)
        np.savez_compressed(target, probabilities=probabilities, properties="{}")
    return folder


def test_ranking_uses_labelled_voxels_never_dense_truth_and_ties_go_to_the_single_model(
    data_roots, capsys
) -> None:
    # dense truth: two vessels (rows y 4..6 and 10..12); the label set knows only the first one
    # and some background (rows y 0..2); everything else is ignore
    dense = np.zeros(SHAPE, np.int16)
    dense[:, 4:7] = 1
    dense[:, 10:13] = 1
    labelled = np.full(SHAPE, 2, np.int16)
    labelled[:, 4:7] = 1
    labelled[:, 0:3] = 0
    first = np.full(SHAPE, 0.1, np.float32)
    first[:, 4:7] = 0.9
    both = np.full(SHAPE, 0.1, np.float32)
    both[:, 4:7] = 0.9
    both[:, 10:13] = 0.8  # the second vessel: right by dense truth, unknown to the label set
    both[:, 0:1] = 0.8  # and a false positive on labelled background
    pre = data_roots["preprocessed"] / DATASET / "data" / "labelsets"
    for case in ("case_a", "case_b"):
        io.save_npy(labelled[None], pre / "pseudo" / f"{case}.npy")
        io.save_npy(dense[None], pre / "dense" / f"{case}.npy")
    _model(data_roots["results"], "plain__pseudo__3d_fullres", {"case_a": first, "case_b": first})
    _model(data_roots["results"], "mip__pseudo__3d_fullres", {"case_a": both, "case_b": both})

    result = find_best_configuration(DATASET)
    rows = {row["name"]: row for row in result["candidates"]}
    assert list(rows) == [
        "mip__pseudo__3d_fullres",
        "plain__pseudo__3d_fullres",
        "mip__pseudo__3d_fullres___plain__pseudo__3d_fullres",
    ]
    n = 3 * 8 * 16  # vessel voxels per case in the first vessel
    fp = 1 * 8 * 16
    assert rows["plain__pseudo__3d_fullres"]["foreground_dice"] == pytest.approx(1.0)
    assert rows["mip__pseudo__3d_fullres"]["foreground_dice"] == pytest.approx(2 * n / (2 * n + fp))
    # the ensemble's mean is below 0.5 wherever only "mip" says vessel: it predicts what "plain" does
    assert rows["mip__pseudo__3d_fullres___plain__pseudo__3d_fullres"]["foreground_dice"] == pytest.approx(
        1.0
    )
    # dense truth prefers "mip", and is only reported
    assert (
        rows["mip__pseudo__3d_fullres"]["dense_foreground_dice"]
        > rows["plain__pseudo__3d_fullres"]["dense_foreground_dice"]
    )
    # tie between "plain" and the ensemble: the single model, listed first, wins
    assert result["best"]["models"] == ["plain__pseudo__3d_fullres"]
    assert result["postprocessing"]["rules"] == {}  # one slab per case: nothing to remove
    command = (
        "mipseg_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d Dataset990_Tiny --trainer plain --labels pseudo"
    )
    assert result["predict_command"] == command
    root = data_roots["results"] / DATASET
    assert command in (root / "inference_instructions.txt").read_text()
    decision = io.read_json(root / "plain__pseudo__3d_fullres" / "postprocessing.json")
    assert decision["decided_for"] == ["plain__pseudo__3d_fullres"] and decision["rules"] == {}
    # the command line prints the same command as its last line
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        find_main(["-d", DATASET, "--disable-ensembling"])
    assert exit_info.value.code in (0, None)
    assert capsys.readouterr().out.strip().splitlines()[-1] == command
    with pytest.raises(SystemExit) as exit_info:
        find_main(["-d", DATASET, "--labels", "missing"])
    assert exit_info.value.code == 2


def _vessel_tree(shape=(24, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A trunk along z with four one-voxel-thin branches touching it (uint8), and the branches alone."""
    tree = np.zeros(shape, np.uint8)
    tree[:, 16, 16] = 1
    branches = np.zeros(shape, np.uint8)
    for z, (dy, dx) in zip((4, 9, 14, 19), ((1, 1), (-1, 1), (1, -1), (-1, -1))):
        for step in range(1, 9):  # diagonal: touches the trunk only at a corner (26-connectivity)
            branches[z, 16 + dy * step, 16 + dx * step] = 1
    return tree | branches, branches


def _case(tree: np.ndarray, piece: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Prediction = tree + (optional disconnected real vessel piece) + 8-voxel false blobs."""
    rng = np.random.default_rng(seed)
    prediction = tree.copy()
    reference = np.where(tree == 1, 1, 0).astype(np.int16)
    if piece:
        prediction[2:22, 4:6, 28] = 1  # 40 voxels, a vessel the network interrupted
        reference[2:22, 4:6, 28] = 1
    for _ in range(6):
        z, y, x = rng.integers(0, 3, 3) * 4 + (10, 20, 2)  # 4 apart: blobs never touch each other
        if not tree[z - 1 : z + 3, y - 1 : y + 3, x - 1 : x + 3].any():
            prediction[z : z + 2, y : y + 2, x : x + 2] = 1  # labelled background: false positives
    return prediction, reference


def test_vessel_rule_never_removes_a_branch_touching_the_main_tree() -> None:
    tree, branches = _vessel_tree()
    small_tree, _ = _vessel_tree((24, 32, 32))
    small_tree[:, 16, 16] = 0
    small_tree[4:7, 16, 16] = 1  # a short trunk with one branch: 11 voxels, smaller than any piece
    small_tree[9:] = 0
    cases = [_case(tree, True, 0), _case(small_tree, False, 1)]
    rules, table = decide_postprocessing(lambda: iter(cases), [1], ignore_label=None, structure="vessel")
    assert {r["kind"] for r in (e for e in table["classes"]["1"]["dice_by_rule"])} == {"none", "tree"}
    assert rules["1"]["kind"] == "tree" and 8 < rules["1"]["min_size"] <= 16  # removes the blobs only
    for (prediction, reference), whole in zip(cases, (tree, small_tree)):
        processed = apply_rules(prediction, rules)
        assert np.all(processed[whole == 1] == 1)  # every trunk and branch voxel stays
        assert np.all(processed[reference == 1] == 1)  # so does the disconnected real piece
        assert np.count_nonzero(processed) == np.count_nonzero(reference)  # the blobs are gone
    assert np.all(apply_rules(cases[0][0], rules)[branches == 1] == 1)
    # the same size as a plain "min_size" rule would delete the small tree: why vessels need "tree"
    plain = apply_rules(cases[1][0], {"1": {"kind": "min_size", "min_size": rules["1"]["min_size"]}})
    assert np.count_nonzero(plain[small_tree == 1]) == 0


def test_organ_rule_keeps_the_largest_blob_and_helps_without_hurting() -> None:
    z, y, x = np.mgrid[:20, :24, :24]
    organ = ((z - 10) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 36).astype(np.uint8)
    cases = []
    for seed in range(2):
        prediction, reference = organ.copy(), organ.astype(np.int16)
        rng = np.random.default_rng(seed)
        for _ in range(3):
            a, b = rng.integers(0, 4, 2) * 4 + 1
            prediction[1:3, a : a + 2, b : b + 2] = 1
        cases.append((prediction, reference))
    rules, table = decide_postprocessing(lambda: iter(cases), [1], ignore_label=None, structure="organ")
    assert rules == {"1": {"kind": "largest"}}  # first of the rules that tie (largest, min_size 16, ...)
    for prediction, reference in cases:
        assert np.array_equal(apply_rules(prediction, rules), reference.astype(np.uint8))
    assert table["classes"]["1"]["dice_without"] < 1.0
    # a rule that cannot help is not kept
    clean = [(organ.copy(), organ.astype(np.int16))]
    assert decide_postprocessing(lambda: iter(clean), [1], ignore_label=None, structure="organ")[0] == {}


def test_organ_union_step_is_refused_when_it_hurts_a_class() -> None:
    # two organs in different places: keeping the largest foreground component would delete one
    segmentation = np.zeros((10, 20, 20), np.uint8)
    segmentation[2:8, 2:8, 2:8] = 1
    segmentation[2:6, 12:16, 12:16] = 2
    segmentation[0, 19, 19] = 1  # a false voxel
    reference = segmentation.astype(np.int16)
    reference[0, 19, 19] = 0
    rules, table = decide_postprocessing(lambda: iter([(segmentation, reference)]), [1, 2], None, "organ")
    assert (
        table["all_foreground_largest"]["accepted"] is False
        and "2" in table["all_foreground_largest"]["hurts_classes"]
    )
    assert "all" not in rules and rules["1"]["kind"] == "largest"
    assert np.array_equal(apply_rules(segmentation, rules), reference.astype(np.uint8))


def test_validation_files_leave_out_a_killed_writers_temporary(tmp_path: Path) -> None:
    from mipseg.selection.oof import validation_files

    vessel = np.full(SHAPE, 0.5, np.float32)
    folder = _model(tmp_path, "plain__pseudo__3d_fullres", {"case_a": vessel, "case_b": vessel})
    (folder / "fold_0" / "validation" / ".case_c.partial-0000dead.npz").write_bytes(b"")
    assert sorted(validation_files(folder)) == ["case_a", "case_b"]
