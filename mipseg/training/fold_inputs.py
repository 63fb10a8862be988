"""What a training run needs before it starts: plans, split, label set, seeds, initial weights.

Resolves fold ``k`` of ``splits.json`` (or ``all``), makes sure the label set and its seeds are on
the preprocessed grid (:func:`~mipseg.planning.preprocessing.preprocess_labelset` /
:func:`~mipseg.planning.preprocessing.preprocess_seeds`; files located by :class:`mipseg.labelset.LabelSet`),
and loads fine-tuning weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mipseg import io, paths
from mipseg.dataset import DatasetSpec, load_dataset
from mipseg.errors import InputError
from mipseg.labelset import LabelSet
from mipseg.planning.plans import Plans, load_plans
from mipseg.planning.preprocessing import labelset_sources, preprocess_labelset, preprocess_seeds
from mipseg.training import checkpoint as ckpt
from mipseg.training import data as data_module


@dataclass
class FoldInputs:
    """Everything resolved before training starts."""

    dataset_name: str
    plans: Plans
    spec: DatasetSpec
    dataset_json: dict[str, Any]
    train_cases: list[data_module.TrainingCase]
    val_cases: list[data_module.TrainingCase]
    data_dir: Path
    labelset_dir: Path
    dense_dir: Path | None
    has_seeds: bool


def parse_fold(fold: str | int) -> int | str:
    """``0..4`` or ``"all"``."""
    if str(fold) == "all":
        return "all"
    if str(fold).isdigit() and 0 <= int(fold) <= 4:
        return int(fold)
    raise InputError(f"fold must be 0..4 or 'all', got {fold!r}")


def split_case_ids(
    preprocessed_dir: Path, fold: int | str, available: list[str]
) -> tuple[list[str], list[str]]:
    """Training and validation case ids of a fold from ``splits.json`` (``all``: every case, twice)."""
    if fold == "all":
        return list(available), list(available)
    splits_path = preprocessed_dir / "splits.json"
    if not splits_path.is_file():
        raise InputError(f"{splits_path}: not found; run mipseg_plan for this dataset first")
    splits = io.read_json(splits_path)
    if not isinstance(splits, list) or fold >= len(splits):
        raise InputError(f"{splits_path}: has no fold {fold}")
    train, val = list(splits[fold]["train"]), list(splits[fold]["val"])
    missing = sorted(set(train + val) - set(available))
    if missing:
        raise InputError(f"{splits_path}: cases {missing[:5]} have no preprocessed label in this label set")
    return train, val


def _labelset_complete(labelset: LabelSet, case_ids: list[str]) -> bool:
    return labelset.preprocessed_folder.is_dir() and all(
        labelset.preprocessed_file(c).is_file() for c in case_ids
    )


def ensure_labelset(dataset: str, name: str, case_ids: list[str]) -> Path:
    """The preprocessed label set folder, made with ``preprocess_labelset`` when incomplete."""
    labelset = LabelSet(dataset, name)
    folder = labelset.preprocessed_folder
    if not _labelset_complete(labelset, case_ids):
        if name != "dense" and not labelset.folder.is_dir():
            raise InputError(
                f"{labelset.folder}: label set {name!r} not found "
                "(make it with mipseg_pseudolabel / mipseg_propagate / mipseg_refine)"
            )
        preprocess_labelset(dataset, name)
    return folder


def ensure_seeds(dataset: str, name: str, case_ids: list[str], data_dir: Path, ignore_label: int) -> bool:
    """Preprocess ``labelsets/{name}/{case}_seeds.nii.gz`` where present; True if any case has seeds."""
    labelset = LabelSet(dataset, name)
    found = False
    for case_id in case_ids:
        raw = labelset.seeds_path(case_id)
        if not raw.is_file():
            continue
        found = True
        out = labelset.preprocessed_file(case_id, "seeds")
        if not out.is_file():
            seeds, _ = io.read_image(raw)
            properties = io.read_json(data_dir / f"{case_id}.json")
            if list(seeds.shape) != list(properties["shape_before_cropping"]):
                raise InputError(f"{raw}: shape {list(seeds.shape)} differs from its image")
            io.save_npy(preprocess_seeds(seeds, properties, ignore_label), out)
    return found


def resolve_inputs(dataset: str | int, fold: int | str, labels: str) -> FoldInputs:
    """Load plans, dataset, split and label set (preprocessing the label set when needed)."""
    name = paths.resolve_dataset(dataset)
    preprocessed = paths.preprocessed_root() / name
    plans = load_plans(preprocessed / "plans.json")
    loaded = load_dataset(name, read_voxels=False)
    case_ids = loaded.case_ids
    data_dir = preprocessed / "data"
    not_preprocessed = [c for c in case_ids if not (data_dir / f"{c}.npy").is_file()]
    if not_preprocessed:
        raise InputError(f"{data_dir}: cases {not_preprocessed[:5]} not preprocessed; run mipseg_plan first")
    if labels == "dense" and not loaded.has_dense_labels:
        raise InputError(
            f"{loaded.folder / 'labelsTr'}: no dense labels, so label set 'dense' does not exist"
        )
    ensure_labelset(name, labels, [])  # a set that does not exist fails here, with its own message
    # the cases the set labels, not its preprocessed copies: a kill while copying leaves some out
    available = sorted(labelset_sources(loaded, labels))
    train_ids, val_ids = split_case_ids(preprocessed, fold, available or case_ids)
    labelset_dir = ensure_labelset(name, labels, sorted(set(train_ids + val_ids)))
    has_seeds = ensure_seeds(
        name, labels, sorted(set(train_ids + val_ids)), data_dir, loaded.spec.ignore_label
    )
    dense_dir = None
    if loaded.has_dense_labels and labels != "dense":
        dense_dir = ensure_labelset(name, "dense", val_ids)
    elif labels == "dense":
        dense_dir = labelset_dir

    labelset = LabelSet(name, labels)
    undrawn = labelset.undrawn_classes()  # {} for dense: it has no report

    def case(case_id: str) -> data_module.TrainingCase:
        seeds = labelset.preprocessed_file(case_id, "seeds")
        return data_module.TrainingCase(
            case_id,
            data_dir / f"{case_id}.npy",
            labelset.preprocessed_file(case_id, "label"),
            seeds if seeds.is_file() else None,
            labelset.preprocessed_file(case_id, "locations"),
            undrawn=undrawn.get(case_id, ()),
        )

    return FoldInputs(
        name,
        plans,
        loaded.spec,
        io.read_json(loaded.folder / "dataset.json"),
        [case(c) for c in train_ids],
        [case(c) for c in val_ids],
        data_dir,
        labelset_dir,
        dense_dir,
        has_seeds,
    )


def load_init_weights(network: nn.Module, path: Path) -> list[str]:
    """Copy weights from a checkpoint for fine-tuning; seg heads of another class count are skipped."""
    source = ckpt.load_checkpoint(path)["network_weights"]
    own = network.state_dict()
    skipped, problems = [], []
    for key, value in own.items():
        if key not in source:
            problems.append(f"{path}: has no weights for {key}; was it trained with other plans?")
        elif source[key].shape != value.shape:
            if key.startswith("seg_heads."):
                skipped.append(key)
            else:
                problems.append(
                    f"{path}: {key} has shape {list(source[key].shape)}, need {list(value.shape)}"
                )
    if problems:
        raise InputError(problems[:5])
    network.load_state_dict({k: (own[k] if k in skipped else source[k]) for k in own})
    return skipped
