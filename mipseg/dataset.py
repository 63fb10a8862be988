"""The raw dataset contract: dataset.json, case discovery and complete validation.

A raw dataset folder looks like::

    raw/Dataset900_Name/
      dataset.json
      imagesTr/{case}_0000.nii.gz        one file per channel
      labelsTr/{case}.nii.gz             optional dense truth
      annotationsTr/{case}_mip{a}.png    mip mode, a in dataset.json "mip_axes"
      annotationsTr/{case}_slice{k}.png  slice mode, k = index along numpy axis 0
      imagesTs/{case}_0000.nii.gz        optional test images

:func:`load_dataset` checks everything at once and raises one :class:`~mipseg.errors.InputError`
listing every problem, each naming its file, so a user fixes a dataset in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io, paths
from mipseg.annotation_png import check_annotation_png, check_some_slice_drawn
from mipseg.errors import InputError

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
ANNOTATION_MODES = ("mip", "slice")
_MIP_PNG = re.compile(r"^(?P<case>.+)_mip(?P<axis>\d+)\.png$")
_SLICE_PNG = re.compile(r"^(?P<case>.+)_slice(?P<index>\d+)\.png$")


@dataclass(frozen=True)
class DatasetSpec:
    """What dataset.json says, checked.

    Attributes
    ----------
    labels
        Label name -> integer value, background first, as nnU-Net v2 (name -> int). Holds
        ``"ignore"`` only if dataset.json does.
    annotation
        ``"mip"``, ``"slice"`` or ``None`` (dense labels only).
    mip_axes
        Numpy axes of the image along which MIPs are drawn (mip mode).
    """

    channel_names: dict[str, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    annotation: str | None = None
    mip_axes: tuple[int, ...] = (0,)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def class_labels(self) -> dict[str, int]:
        """Labels without ``"ignore"``: background and the classes to segment."""
        return {name: value for name, value in self.labels.items() if name != "ignore"}

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(v for v in self.class_labels.values() if v != 0)

    @property
    def num_classes(self) -> int:
        """Number of network outputs: background plus every foreground label."""
        return len(self.class_labels)

    @property
    def ignore_label(self) -> int:
        """Value marking unknown voxels in a label set: ``labels["ignore"]`` or max label + 1."""
        return self.labels.get("ignore", max(self.class_labels.values()) + 1)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update(
            channel_names=self.channel_names,
            labels=self.labels,
            numTraining=self.num_training,
            file_ending=self.file_ending,
        )
        if self.annotation is not None:
            data["annotation"] = self.annotation
        if self.annotation == "mip":
            data["mip_axes"] = list(self.mip_axes)
        return data


@dataclass(frozen=True)
class Case:
    """Files of one case.

    ``annotations`` maps a MIP axis (mip mode) or a slice index (slice mode) to its PNG.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    annotations: dict[int, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    """A validated raw dataset."""

    name: str
    folder: Path
    spec: DatasetSpec
    cases: tuple[Case, ...]
    test_cases: tuple[Case, ...] = ()

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(case_id)

    @property
    def has_dense_labels(self) -> bool:
        return bool(self.cases) and all(case.label is not None for case in self.cases)


def parse_dataset_json(data: Any, source: str = "dataset.json") -> tuple[DatasetSpec | None, list[str]]:
    """Check the content of a dataset.json; returns the spec (None if unusable) and the problems."""
    if not isinstance(data, dict):
        return None, [f"{source}: expected a JSON object, found {type(data).__name__}"]
    problems = [f"{source}: missing key {key!r}" for key in REQUIRED_KEYS if key not in data]
    if "modality" in data and "channel_names" not in data:
        problems.append(
            f"{source}: this is nnU-Net v1's dataset.json: rename 'modality' to 'channel_names', write "
            "'labels' as name -> value, add 'file_ending', drop 'training'/'test' (files are found by name)"
        )
    # check the keys that are there too, so one run lists every problem of the file
    channels, labels = data.get("channel_names", {"0": "?"}), data.get("labels", {"background": 0})
    if not isinstance(channels, dict) or not channels:
        problems.append(f'{source}: \'channel_names\' must be a non-empty object like {{"0": "CT"}}')
    elif sorted(channels) != [str(i) for i in range(len(channels))]:
        problems.append(
            f"{source}: 'channel_names' keys must be 0..{len(channels) - 1}, found {sorted(channels)}"
        )
    if not isinstance(labels, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels.values()
    ):
        regions = isinstance(labels, dict) and any(isinstance(v, list) for v in labels.values())
        hint = " (region-based labels, lists of values, are not supported)" if regions else ""
        problems.append(f"{source}: 'labels' must map names to integers, found {labels!r}{hint}")
    else:
        values = sorted(v for k, v in labels.items() if k != "ignore")
        if values[:1] != [0] or "background" not in labels or labels["background"] != 0:
            problems.append(f"{source}: 'labels' needs \"background\": 0, found {labels!r}")
        elif values != list(range(len(values))):
            problems.append(
                f"{source}: label values must be consecutive 0..{len(values) - 1}, found {values}"
            )
        elif "ignore" in labels and labels["ignore"] != values[-1] + 1:
            problems.append(
                f"{source}: 'ignore' must be max label + 1 = {values[-1] + 1}, found {labels['ignore']}"
            )
    num_training = data.get("numTraining", 0)
    if not isinstance(num_training, int) or isinstance(num_training, bool) or num_training < 0:
        problems.append(f"{source}: 'numTraining' must be a non-negative integer, found {num_training!r}")
    ending = data.get("file_ending", io.IMAGE_ENDINGS[0])
    if not isinstance(ending, str) or ending.lower() not in io.IMAGE_ENDINGS:
        problems.append(f"{source}: 'file_ending' {ending!r} is not one of {', '.join(io.IMAGE_ENDINGS)}")
    annotation = data.get("annotation")
    if annotation is not None and annotation not in ANNOTATION_MODES:
        problems.append(f'{source}: \'annotation\' must be "mip" or "slice", found {annotation!r}')
    mip_axes = data.get("mip_axes", [0])
    if (
        not isinstance(mip_axes, list)
        or not mip_axes
        or len(set(mip_axes)) != len(mip_axes)
        or not all(isinstance(a, int) and 0 <= a <= 2 for a in mip_axes)
    ):
        problems.append(
            f"{source}: 'mip_axes' must be a list of distinct axes from 0, 1, 2, found {mip_axes!r}"
        )
    if problems:
        return None, problems
    extra = {k: v for k, v in data.items() if k not in REQUIRED_KEYS + ("annotation", "mip_axes")}
    spec = DatasetSpec(
        channel_names=dict(channels),
        labels=dict(labels),
        num_training=data["numTraining"],
        file_ending=ending,
        annotation=annotation,
        mip_axes=tuple(mip_axes),
        extra=extra,
    )
    return spec, []


def load_dataset(
    identifier: str | int | Path,
    *,
    read_voxels: bool = True,
    require_annotations: bool = False,
    require_labels: bool = False,
    check_annotations: bool = True,
) -> Dataset:
    """Load and completely validate a raw dataset.

    Parameters
    ----------
    identifier
        ``900``, ``"Dataset900_Name"`` (resolved under ``$MIPSEG_RAW``) or a folder path.
    read_voxels
        Read every image fully, which finds truncated files and checks label values. With
        ``False`` only headers are read (shapes and geometry are still checked).
    require_annotations
        Every training case must have its annotation PNG(s) (mip: one per axis in
        ``mip_axes``; slice: at least one slice).
    require_labels
        Every training case must have a dense label in labelsTr.
    check_annotations
        Read every annotation PNG (grid, values, no empty MIP, not every slice of a case empty).
        ``mipseg_annotate`` turns it off to open a dataset whose drawings it is there to fix; file
        names are checked either way.

    Raises
    ------
    InputError
        With one line per problem found, each naming its file.
    """
    folder = Path(identifier) if isinstance(identifier, Path) else paths.raw_dataset_dir(identifier)
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found")
    spec, problems = parse_dataset_json(io.read_json(folder / "dataset.json"), str(folder / "dataset.json"))
    if spec is None:
        raise InputError(problems)

    cases, problems = _discover_cases(folder / "imagesTr", spec)
    if not cases:
        endings = sorted({io.compound_suffix(p) for p in _visible((folder / "imagesTr").glob("*_0000.*"))})
        other = f" (found {', '.join(endings)}: is file_ending in dataset.json right?)" if endings else ""
        problems.append(
            f"{folder / 'imagesTr'}: no training images named {{case}}_0000{spec.file_ending}{other}"
        )
    elif len(cases) != spec.num_training:
        problems.append(
            f"{folder / 'dataset.json'}: numTraining is {spec.num_training} but imagesTr holds "
            f"{len(cases)} cases"
        )
    labels = _files_by_case(folder / "labelsTr", spec.file_ending, problems, known=cases)
    annotations = _discover_annotations(folder / "annotationsTr", spec, problems, known=cases)
    test_cases, test_problems = _discover_cases(folder / "imagesTs", spec)
    problems += test_problems

    checked: list[Case] = []
    for case_id, images in cases.items():
        case = Case(case_id, tuple(images), labels.get(case_id), annotations.get(case_id, {}))
        problems += validate_case(case, spec, read_voxels=read_voxels, check_annotations=check_annotations)
        if require_labels and case.label is None:
            problems.append(f"{folder / 'labelsTr' / (case_id + spec.file_ending)}: dense label missing")
        if require_annotations:
            problems += _missing_annotations(case, spec, folder / "annotationsTr")
        checked.append(case)
    tests = tuple(Case(cid, tuple(images)) for cid, images in test_cases.items())
    for case in tests:
        problems += validate_case(case, spec, read_voxels=False)
    if problems:
        raise InputError(problems)
    return Dataset(folder.name, folder, spec, tuple(checked), tests)


def validate_case(
    case: Case, spec: DatasetSpec, *, read_voxels: bool = True, check_annotations: bool = True
) -> list[str]:
    """Every problem of one case: channel geometry, label values and geometry, annotation grids."""
    problems: list[str] = []
    shapes, geometries, arrays = [], [], []
    for path in case.images:
        try:
            if read_voxels:
                array, geometry = io.read_image(path)
                arrays.append(array)
                shape = array.shape
            else:
                shape, geometry = io.read_image_header(path)
        except InputError as error:
            problems += error.problems
            continue
        shapes.append(shape)
        geometries.append(geometry)
    if len(shapes) != len(case.images):
        return problems
    reference_shape, reference = shapes[0], geometries[0]
    for path, shape, geometry in zip(case.images[1:], shapes[1:], geometries[1:]):
        if shape != reference_shape or not geometry.matches(reference):
            problems.append(
                f"{path}: geometry {_describe(shape, geometry)} differs from channel 0 "
                f"{_describe(reference_shape, reference)}"
            )
    if case.label is not None:
        problems += _check_label(case.label, reference_shape, reference, spec, read_voxels)
    if check_annotations:
        for key, png in sorted(case.annotations.items()):
            problems += check_annotation_png(png, spec, reference_shape, key)
        if spec.annotation == "slice" and case.annotations and not problems:
            problems += check_some_slice_drawn(case.case_id, case.annotations)
    return problems


def _check_label(
    path: Path, shape: tuple[int, ...], geometry: io.Geometry, spec: DatasetSpec, read_voxels: bool
) -> list[str]:
    try:
        if read_voxels:
            array, label_geometry = io.read_image(path)
            label_shape = array.shape
        else:
            label_shape, label_geometry = io.read_image_header(path)
    except InputError as error:
        return error.problems
    if label_shape != shape or not label_geometry.matches(geometry):
        return [
            f"{path}: geometry {_describe(label_shape, label_geometry)} does not match its image "
            f"{_describe(shape, geometry)}"
        ]
    if not read_voxels:
        return []
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        return [f"{path}: label values must be integers, found non-integer values"]
    unknown = sorted(set(np.unique(array).astype(np.int64).tolist()) - set(spec.class_labels.values()))
    if unknown:
        return [
            f"{path}: label values {unknown[:10]} are not in dataset.json labels "
            f"{sorted(spec.class_labels.values())}"
        ]
    return []


def _visible(paths: Iterable[Path]) -> list[Path]:
    """Sorted, without hidden files: macOS's ``._{name}`` copies and a killed writer's temporaries."""
    return sorted(path for path in paths if not path.name.startswith("."))


def _discover_cases(folder: Path, spec: DatasetSpec) -> tuple[dict[str, list[Path]], list[str]]:
    """Group ``{case}_{XXXX}{ending}`` files by case; report cases missing a channel."""
    if not folder.is_dir():
        return {}, []
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(spec.file_ending) + "$")
    found: dict[str, dict[int, Path]] = {}
    problems = []
    for path in _visible(folder.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            found.setdefault(match["case"], {})[int(match["channel"])] = path
        elif path.name.endswith(spec.file_ending):  # nnU-Net's most common naming slip: no _0000
            problems.append(
                f"{path}: name does not follow {{case}}_{{XXXX}}{spec.file_ending} (channel 0: _0000)"
            )
    cases = {}
    for case_id, channels in sorted(found.items()):
        missing = [c for c in range(spec.num_channels) if c not in channels]
        extra = sorted(set(channels) - set(range(spec.num_channels)))
        if missing:
            names = ", ".join(f"{case_id}_{c:04d}{spec.file_ending}" for c in missing)
            problems.append(f"{folder}: case {case_id} lacks channel file(s) {names}")
        elif extra:
            problems.append(
                f"{folder}: case {case_id} has channels {extra} not in dataset.json channel_names"
            )
        else:
            cases[case_id] = [channels[c] for c in range(spec.num_channels)]
    return cases, problems


def _files_by_case(folder: Path, ending: str, problems: list[str], known: Iterable[str]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    known = set(known)
    files = {}
    for path in _visible(folder.glob(f"*{ending}")):
        case_id = path.name[: -len(ending)]
        if case_id in known:
            files[case_id] = path
        else:
            problems.append(f"{path}: no image in imagesTr for case {case_id!r}")
    return files


def _discover_annotations(
    folder: Path, spec: DatasetSpec, problems: list[str], known: Iterable[str]
) -> dict[str, dict[int, Path]]:
    if not folder.is_dir():
        return {}
    known = set(known)
    pattern = _SLICE_PNG if spec.annotation == "slice" else _MIP_PNG
    found: dict[str, dict[int, Path]] = {}
    for path in _visible(folder.glob("*.png")):
        match = pattern.match(path.name)
        if spec.annotation is None:
            problems.append(f'{path}: dataset.json has no \'annotation\' mode ("mip" or "slice")')
        elif not match:
            form = "{case}_slice{k}.png" if spec.annotation == "slice" else "{case}_mip{axis}.png"
            problems.append(f"{path}: name does not follow {form}")
        elif match["case"] not in known:
            problems.append(f"{path}: no image in imagesTr for case {match['case']!r}")
        elif spec.annotation == "mip" and int(match["axis"]) not in spec.mip_axes:
            problems.append(
                f"{path}: axis {match['axis']} is not in dataset.json mip_axes {list(spec.mip_axes)}"
            )
        else:
            key = int(match["index"] if spec.annotation == "slice" else match["axis"])
            found.setdefault(match["case"], {})[key] = path
    return found


def _missing_annotations(case: Case, spec: DatasetSpec, folder: Path) -> list[str]:
    if spec.annotation == "mip":
        return [
            f"{folder / f'{case.case_id}_mip{axis}.png'}: annotation missing"
            for axis in spec.mip_axes
            if axis not in case.annotations
        ]
    if spec.annotation == "slice" and not case.annotations:
        return [f"{folder / f'{case.case_id}_slice{{k}}.png'}: annotation missing (no slice annotated)"]
    if spec.annotation is None:
        return [f"{folder.parent / 'dataset.json'}: no 'annotation' mode set, so no annotations can be read"]
    return []


def _describe(shape: tuple[int, ...], geometry: io.Geometry) -> str:
    spacing = ", ".join(f"{s:g}" for s in geometry.spacing_zyx)
    origin = ", ".join(f"{o:g}" for o in geometry.origin)
    return f"shape {tuple(shape)} spacing ({spacing}) origin ({origin})"
