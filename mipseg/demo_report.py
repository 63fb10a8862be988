"""The final table of ``scripts/demo.sh``: every stage's score on the synthetic datasets, and QC pictures.

It only reads what the demo's commands wrote (``report.json`` of the label sets, ``summary.json`` of
``mipseg_evaluate``) plus the raw test images for the oracle threshold, so it runs in seconds:

``python -m mipseg.demo_report --vessels 900 --organs 901``

Dice definitions (all against the dense truth the synthetic data comes with):

* best global threshold: one intensity threshold for all test images, the best one in hindsight
  (``mipseg.synthetic.best_threshold_dice``; voxels of all test cases pooled); an oracle reference.
* label sets (pseudo, refined, propagated): the voxels a label set calls foreground against the true
  foreground of the training cases, as the label set's ``report.json`` gives it (ignore = not
  foreground; ``summary.foreground_dice`` of :mod:`mipseg.labelset`), mean over cases.
* models: mean Dice over the test cases from the ``summary.json`` of ``mipseg_evaluate``.

Multi-organ datasets (``mipseg_synthesize --organ-classes N``) get a second table with the organ rows
per class: each class's Dice (label sets: ``summary.agreement_mean[class].dice`` of ``report.json``;
models: ``mean[value].Dice`` of ``summary.json``) and their mean, which is the first table's Dice.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mipseg import io, paths
from mipseg.dataset import load_dataset
from mipseg.labelset import LabelSet
from mipseg.planning.mip import maximum_intensity_projection
from mipseg.synthetic.annotation import best_threshold_dice

PREDICTIONS_FOLDER = "demo_predictions"  # under results/DatasetX/, as scripts/demo.sh writes them
MIN_PICTURE_SIZE = 256  # pixels along the longer side of a QC picture
VESSEL_MODELS = {
    "pseudo": "model on pseudo-labels",
    "refined": "refined model (fine-tuned)",
    "dense": "dense-label upper bound",
}


@dataclass(frozen=True)
class Row:
    """One line of the table: which pipeline, what was scored, on which cases, the Dice."""

    pipeline: str
    method: str
    scored_on: str
    dice: float


@dataclass(frozen=True)
class ClassRow:
    """One line of the per-class table: an organ row of :class:`Row`, Dice per foreground class."""

    method: str
    scored_on: str
    dice: dict[str, float]  # class name -> Dice (NaN where undefined)
    mean: float  # the Dice of the same row in the main table


def summary_dice(summary_path: Path) -> float:
    """``foreground_mean`` Dice of a ``mipseg_evaluate`` summary.json."""
    return float(io.read_json(summary_path)["foreground_mean"]["Dice"])


def test_pairs(dataset_id: int | str) -> list[tuple[Path, Path]]:
    """(first channel image, label) of every test case that has a label in ``labelsTs``."""
    dataset = load_dataset(dataset_id, read_voxels=False)
    labels_folder = dataset.folder / "labelsTs"
    pairs = []
    for case in dataset.test_cases:
        label = labels_folder / f"{case.case_id}{dataset.spec.file_ending}"
        if label.is_file():
            pairs.append((case.images[0], label))
    return pairs


def threshold_row(dataset_id: int | str) -> Row:
    """Oracle global threshold on the test images (the best Dice any single threshold reaches)."""
    pairs = test_pairs(dataset_id)
    images = [io.read_image(image, np.float32)[0] for image, _ in pairs]
    labels = [io.read_image(label)[0] for _, label in pairs]
    dice, threshold = best_threshold_dice(images, labels)
    return Row("vessels", f"best global threshold (oracle, t={threshold:.4g})", "test (pooled)", dice)


def vessel_rows(dataset_id: int | str) -> list[Row]:
    """Threshold, pseudo-labels, refined labels, and the three models of the vessel demo."""
    predictions = paths.results_dataset_dir(dataset_id) / PREDICTIONS_FOLDER
    rows = [threshold_row(dataset_id)]
    for name, method in (("pseudo", "pseudo-labels"), ("refined", "refined labels")):
        labelset = LabelSet.of(dataset_id, name)
        if labelset.report_path.is_file():
            rows.append(Row("vessels", method, "train cases", labelset.foreground_dice()))
    for name, method in VESSEL_MODELS.items():
        summary = predictions / name / "summary.json"
        if summary.is_file():
            rows.append(Row("vessels", method, "test cases", summary_dice(summary)))
    return rows


def organ_rows(dataset_id: int | str) -> list[Row]:
    """Registration vs flow propagation of the annotated slices, and the model trained on flow labels."""
    return [Row("organs", row.method, row.scored_on, row.mean) for row in organ_class_rows(dataset_id)]


def organ_class_rows(dataset_id: int | str) -> list[ClassRow]:
    """The organ rows with the Dice of every foreground class of the dataset (see the module docstring)."""
    classes = {
        name: value
        for name, value in load_dataset(dataset_id, read_voxels=False).spec.class_labels.items()
        if value != 0
    }
    rows = []
    for labelset in LabelSet.all_of(dataset_id):
        report = labelset.read_report()
        if "method" not in report or "foreground_dice" not in report["summary"]:
            continue  # not a propagated set, or no dense truth to score it against
        means = report["summary"].get("agreement_mean", {})
        dice = {name: _number(means.get(name, {}).get("dice")) for name in classes}
        method = f"{report['method']} propagation ({labelset.name})"
        rows.append(ClassRow(method, "train cases", dice, labelset.foreground_dice()))
    for summary_path in sorted(
        (paths.results_dataset_dir(dataset_id) / PREDICTIONS_FOLDER).glob("*/summary.json")
    ):
        summary = io.read_json(summary_path)
        dice = {
            name: _number(summary["mean"].get(str(value), {}).get("Dice")) for name, value in classes.items()
        }
        method = f"model on {summary_path.parent.name} labels"
        rows.append(ClassRow(method, "test cases", dice, summary_dice(summary_path)))
    return rows


def _number(value: float | None) -> float:
    """A Dice from a JSON file; None (undefined) becomes NaN, shown as n/a."""
    return math.nan if value is None else float(value)


def overlay(background: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """RGB picture of a 2D image with agreement colours.

    Parameters
    ----------
    background : np.ndarray, shape (rows, cols)
        Intensities (MIP or slice); shown in grey, 1st to 99.9th percentile.
    truth, prediction : np.ndarray of bool or int, shape (rows, cols)
        Masks or label maps (0 = background).

    Returns
    -------
    np.ndarray of uint8, shape (rows, cols, 3)
        Green = the truth's class predicted, red = truth missed or given another class,
        yellow = predicted where the truth is background; enlarged by an integer factor when the
        picture is smaller than ``MIN_PICTURE_SIZE``.
    """
    low, high = np.percentile(background, [1.0, 99.9])
    grey = np.clip((background - low) / max(high - low, 1e-6), 0.0, 1.0)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    agree = (truth > 0) & (truth == prediction)
    areas = {
        (0, 200, 0): agree,
        (230, 0, 0): (truth > 0) & ~agree,
        (240, 220, 0): (prediction > 0) & (truth == 0),
    }
    for colour, mask in areas.items():
        rgb[mask] = (0.4 * rgb[mask] + 0.6 * np.array(colour)).astype(np.uint8)
    # Small demo volumes give stamp-sized pictures: enlarge by whole pixels (no interpolation).
    scale = max(1, MIN_PICTURE_SIZE // max(rgb.shape[:2]))
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def write_vessel_mip_overlays(dataset_id: int | str, axis: int = 0) -> list[Path]:
    """MIP overlay (truth vs prediction, both projected) per test case and vessel model."""
    predictions = paths.results_dataset_dir(dataset_id) / PREDICTIONS_FOLDER
    written = []
    for image_path, label_path in test_pairs(dataset_id):
        image = io.read_image(image_path, np.float32)[0]
        truth = io.read_image(label_path)[0] > 0
        mip = maximum_intensity_projection(image, axis)[0]
        for name in VESSEL_MODELS:
            prediction_path = predictions / name / label_path.name
            if not prediction_path.is_file():
                continue
            prediction = io.read_image(prediction_path)[0] > 0
            target = predictions / "qc" / f"{_case_name(label_path)}_{name}_mip{axis}.png"
            io.write_png(overlay(mip, truth.any(axis), prediction.any(axis)), target)
            written.append(target)
    return written


def write_organ_slice_overlays(dataset_id: int | str) -> list[Path]:
    """Slice overlay (truth vs prediction) per organ test case and model, on the slice of most organ."""
    predictions = paths.results_dataset_dir(dataset_id) / PREDICTIONS_FOLDER
    written = []
    for image_path, label_path in test_pairs(dataset_id):
        image = io.read_image(image_path, np.float32)[0]
        truth = io.read_image(label_path)[0]  # label maps: a neighbour given the organ's class is missed
        index = int(np.argmax((truth > 0).sum(axis=(1, 2))))
        for prediction_path in sorted(predictions.glob(f"*/{label_path.name}")):
            prediction = io.read_image(prediction_path)[0]
            name = prediction_path.parent.name
            target = predictions / "qc" / f"{_case_name(label_path)}_{name}_slice{index}.png"
            io.write_png(overlay(image[index], truth[index], prediction[index]), target)
            written.append(target)
    return written


def _case_name(label_path: Path) -> str:
    """Case id of a label file (its name without the file ending, e.g. ``.nii.gz``)."""
    name = label_path.name
    return name[: name.index(".")] if "." in name else name


def qc_pictures(vessel_id: int | str | None, organ_id: int | str | None) -> dict[str, list[Path]]:
    """Every QC picture of the demo: the ones the stages wrote and the prediction overlays made here."""
    pictures: dict[str, list[Path]] = {}
    if vessel_id is not None:
        pre = paths.preprocessed_dataset_dir(vessel_id)
        pictures["vessel MIPs (mipseg_plan)"] = sorted((pre / "mips").glob("*_mips.png"))
        pictures["pseudo-label MIP overlays"] = sorted((pre / "labelsets" / "pseudo" / "qc").glob("*.png"))
        pictures["prediction MIP overlays (test)"] = write_vessel_mip_overlays(vessel_id)
    if organ_id is not None:
        pre = paths.preprocessed_dataset_dir(organ_id)
        pictures["suggested slices"] = sorted((pre / "suggested_slices").glob("*.png"))
        pictures["prediction slice overlays (test)"] = write_organ_slice_overlays(organ_id)
    return pictures


def results_table(rows: list[Row]) -> Table:
    """The rich table of the rows."""
    table = Table(title="mipseg demo: Dice against the dense synthetic truth")
    for column, justify in (("data", "left"), ("method", "left"), ("scored on", "left"), ("Dice", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        dice = "n/a" if math.isnan(row.dice) else f"{row.dice:.3f}"
        table.add_row(row.pipeline, row.method, row.scored_on, dice)
    return table


def class_table(rows: list[ClassRow]) -> Table:
    """The rich table of the per-class rows: one column per class, then their mean."""
    table = Table(title="organs per class: Dice against the dense synthetic truth")
    names = list(rows[0].dice) if rows else []
    for column in ("method", "scored on"):
        table.add_column(column, justify="left")
    for column in [*names, "mean"]:
        table.add_column(column, justify="right")
    for row in rows:
        values = [row.dice[name] for name in names] + [row.mean]
        table.add_row(row.method, row.scored_on, *("n/a" if math.isnan(v) else f"{v:.3f}" for v in values))
    return table


def main(argv: list[str] | None = None) -> None:
    """Print the demo table and the QC picture paths; optionally write the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vessels", help="vessel dataset id or name (MIP-annotated demo)")
    parser.add_argument("--organs", help="organ dataset id or name (slice-annotated demo)")
    parser.add_argument("--json", type=Path, help="also write the rows and picture paths to this file")
    args = parser.parse_args(argv)
    class_rows = organ_class_rows(args.organs) if args.organs else []
    rows = (vessel_rows(args.vessels) if args.vessels else []) + [
        Row("organs", row.method, row.scored_on, row.mean) for row in class_rows
    ]
    pictures = qc_pictures(args.vessels, args.organs)
    console = Console()
    console.print("QC pictures (overlays: green = agrees, yellow = extra / false positive, red = missed):")
    for kind, files in pictures.items():
        console.print(f"  {kind}: {len(files)}")
        for path in files:
            console.print(f"    {path}", soft_wrap=True)
    console.print(results_table(rows))
    if class_rows and len(class_rows[0].dice) > 1:  # one class: the main table says it all
        console.print(class_table(class_rows))
    if args.json is not None:
        io.write_json(
            {
                "rows": [asdict(row) for row in rows],
                "organ_classes": [asdict(row) for row in class_rows],
                "qc_pictures": {kind: [str(p) for p in files] for kind, files in pictures.items()},
            },
            args.json,
        )


if __name__ == "__main__":
    main()
