"""The prediction stage behind ``mipseg_predict``: find cases, split them, predict, write, report.

Work is pipelined over three threads so that the CPU or GPU never waits for files: a loader
thread reads and preprocesses the next case while the main thread runs the sliding window on
the current one (torch releases the GIL during its kernels), and a writer thread resamples the
previous case back to its raw grid and writes it. A case whose files are missing or unreadable
is reported at the end; the other cases are still predicted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mipseg import io
from mipseg.errors import InputError
from mipseg.inference import export
from mipseg.inference.model_package import opened_models
from mipseg.inference.postprocessing import DECISION_FILE, read_decision
from mipseg.inference.predictor import Predictor, load_predictor, resolve_model_dir
from mipseg.planning.plans import Plans
from mipseg.planning.preprocessing import preprocess_case
from mipseg.progress import progress_bar

MAX_PENDING_EXPORTS = 2  # finished cases waiting to be written; bounds memory like nnU-Net's export queue


@dataclass(frozen=True)
class InputCase:
    """The channel files of one case to predict, or why it cannot be predicted."""

    case_id: str
    files: tuple[Path, ...] = ()
    problem: str | None = None


def _channel_pattern(file_ending: str) -> re.Pattern:
    return re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + "$")


def discover_cases(inputs: Sequence[str | Path], num_channels: int, file_ending: str) -> list[InputCase]:
    """Group input files into cases, sorted by case id.

    Parameters
    ----------
    inputs
        One folder holding ``{case}_{XXXX}{file_ending}`` files, or a list of files named that
        way; with one channel a file may also be named ``{case}{ending}`` (any image ending).
    num_channels
        Channels every case must have (dataset.json ``channel_names``).

    Returns
    -------
    list of InputCase
        Cases lacking a channel, with unexpected channels or missing files carry a ``problem``.

    Raises
    ------
    InputError
        The input does not exist or holds no case at all.
    """
    inputs = [Path(p) for p in inputs]
    pattern = _channel_pattern(file_ending)
    if len(inputs) == 1 and not inputs[0].exists():
        raise InputError(f"{inputs[0]}: no such folder or file")
    if len(inputs) == 1 and inputs[0].is_dir():
        # hidden files left out: macOS's ._{name} copies, a killed writer's temporaries
        visible = (p for p in inputs[0].iterdir() if not p.name.startswith("."))
        files = sorted(p for p in visible if p.is_file() and pattern.match(p.name))
        source = str(inputs[0])
        if not files:
            raise InputError(f"{source}: no files named {{case}}_{{XXXX}}{file_ending} to predict")
    else:
        folders = [p for p in inputs if p.is_dir()]
        if folders:
            raise InputError(
                f"-i takes one folder or a list of files, got folder {folders[0]} among several inputs"
            )
        files, source = inputs, "input files"
    channels: dict[str, dict[int, Path]] = {}
    problems: dict[str, str] = {}
    for path in files:
        match = pattern.match(path.name)
        if match:
            case_id, channel = match["case"], int(match["channel"])
        elif num_channels == 1:
            ending = io.compound_suffix(path)
            case_id, channel = path.name[: len(path.name) - len(ending)], 0
        else:
            raise InputError(
                f"{path}: not named {{case}}_{{XXXX}}{file_ending}, needed for {num_channels} channels"
            )
        channels.setdefault(case_id, {})[channel] = path
        if not path.is_file():
            problems.setdefault(case_id, f"{path}: file not found")
    cases = []
    for case_id, found in sorted(channels.items()):
        missing = [c for c in range(num_channels) if c not in found]
        extra = sorted(set(found) - set(range(num_channels)))
        problem = problems.get(case_id)
        if missing:
            names = ", ".join(f"{case_id}_{c:04d}{file_ending}" for c in missing)
            problem = f"{source}: case {case_id} lacks channel file(s) {names}"
        elif extra:
            problem = f"{source}: case {case_id} has channels {extra}; the model takes {num_channels}"
        files_of_case = tuple(found[c] for c in range(num_channels)) if problem is None else ()
        cases.append(InputCase(case_id, files_of_case, problem))
    return cases


def select_part(cases: Sequence[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """Cases of part ``part_id`` of ``num_parts``: ``sorted(cases)[part_id::num_parts]``."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"--part-id {part_id} --num-parts {num_parts}: need 0 <= part-id < num-parts")
    return sorted(cases, key=lambda case: case.case_id)[part_id::num_parts]


def case_is_done(output_dir: Path, case_id: str, save_probabilities: bool) -> bool:
    """True if every output of a case exists (files are written atomically, probabilities first)."""
    done = export.segmentation_path(output_dir, case_id).is_file()
    return done and (not save_probabilities or export.probabilities_path(output_dir, case_id).is_file())


def read_case(files: Sequence[Path]) -> tuple[np.ndarray, io.Geometry]:
    """All channels of a case as float32 ``(C, Z, Y, X)`` and the geometry of channel 0.

    Raises
    ------
    InputError
        A file is unreadable, or a channel's shape or geometry differs from channel 0.
    """
    arrays, geometry = [], None
    for path in files:
        array, channel_geometry = io.read_image(path, np.float32)
        if geometry is None:
            geometry = channel_geometry
        elif array.shape != arrays[0].shape or not channel_geometry.matches(geometry):
            raise InputError(f"{path}: shape or geometry differs from channel 0 ({files[0].name})")
        arrays.append(array)
    return np.stack(arrays), geometry


def _load_and_preprocess(case: InputCase, plans: Plans) -> tuple[np.ndarray, dict[str, Any]]:
    images, geometry = read_case(case.files)
    data, _, properties = preprocess_case(images, geometry, plans)
    return data, properties


@dataclass(frozen=True)
class PredictionSettings:
    """Which model and how to predict; the defaults are ``mipseg_predict``'s.

    ``folds``, ``trainer``, ``checkpoint``: which model (see
    :func:`mipseg.inference.predictor.resolve_model_dir` and
    :func:`~mipseg.inference.predictor.find_folds` for the defaults of ``None``); ``step_size``,
    ``tta``, ``batch_size``: sliding-window step (fraction of the patch), mirroring, tiles per batch;
    ``save_probabilities``: also write ``{case}.npz`` (key ``probabilities``, float16 ``(K, Z, Y, X)``);
    ``postprocess``, ``min_component_size``: remove components smaller than ``min_component_size``
    voxels (learned from the folds when ``None``); ``engine``, ``precision``: what runs the network
    on CPU and in which precision (see :mod:`mipseg.inference.engines`).
    """

    folds: tuple[str | int, ...] | None = None
    trainer: str | None = None
    checkpoint: str = "final"
    step_size: float = 0.5
    tta: bool = True
    batch_size: int | None = None
    save_probabilities: bool = False
    postprocess: bool = False
    min_component_size: int | None = None
    engine: str = "auto"
    precision: str = "float32"

    def problems(self) -> list[str]:
        """One line per invalid setting."""
        found = []
        if not 0 < self.step_size <= 1:
            found.append(f"--step-size {self.step_size}: must be in (0, 1]")
        if self.batch_size is not None and self.batch_size < 1:
            found.append(f"--batch-size {self.batch_size}: must be at least 1")
        return found


def predict_folder(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    dataset: str | int | None = None,
    *,
    models: Sequence[str | Path] | None = None,
    labels: str | None = None,
    settings: PredictionSettings | None = None,
    resume: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    device: str = "auto",
    show_progress: bool = True,
) -> list[Path]:
    """Predict every case of ``inputs`` with the fold ensemble of a trained model.

    Parameters
    ----------
    inputs
        A folder with ``{case}_{XXXX}{file_ending}`` files or a list of such files.
    output
        Folder for ``{case}.nii.gz`` (input geometry), optional ``{case}.npz`` and the run's
        ``plans.json``, ``dataset.json``, ``predict_args.json``.
    dataset
        Dataset id or name whose model to use (its results tree), or ``None`` with ``models``.
    models
        Instead of ``dataset``: model packages (``.zip``) or model folders (``-m``); several
        are ensembled. No raw or preprocessed dataset is needed.
    labels
        Label set the model was trained on (``None``: the only one).
    settings
        Model choice, sliding window, outputs (:class:`PredictionSettings`; ``None`` = defaults).
    resume
        Skip cases whose outputs all exist (``--continue``).
    num_parts, part_id
        Predict only ``sorted(cases)[part_id::num_parts]``.

    Returns
    -------
    list of Path
        Segmentations of this part (predicted now or found finished with ``resume``).

    Raises
    ------
    InputError
        Bad arguments or no model (before anything is predicted), or, after all other cases
        were written, one line per case that could not be predicted.
    """
    settings = settings or PredictionSettings()
    if settings.problems():
        raise InputError(settings.problems())
    if (dataset is None) == (not models):
        raise InputError("name the model with -d DATASET or with -m MODEL, one of the two")
    with contextlib.ExitStack() as stack:
        if models:
            if settings.trainer is not None or labels is not None:
                raise InputError(
                    "-m MODEL fixes the trainer and the label set; drop --trainer/--labels "
                    "(they choose a model of -d DATASET)"
                )
            model_dirs = [folder for m in models for folder in stack.enter_context(opened_models(m))]
            settings = dataclasses.replace(
                settings, checkpoint=packaged_checkpoint(model_dirs, settings.checkpoint)
            )
        else:
            model_dirs = [resolve_model_dir(dataset, settings.trainer, labels)]
        run = _Run(inputs, Path(output), dataset, labels, settings, resume, device, show_progress)
        return _predict(model_dirs, run, num_parts, part_id)


def packaged_checkpoint(model_dirs: Sequence[Path], requested: str) -> str:
    """The checkpoint kind to load from packaged model folders.

    A package holds one checkpoint kind (``mipseg_export_model --checkpoint``); when the default
    ``final`` was asked for and the folders hold only another kind, that kind is used instead of
    failing with "no fold holds checkpoint_final.pt".
    """
    kinds = {
        path.stem.removeprefix("checkpoint_")
        for folder in model_dirs
        for path in folder.glob("fold_*/checkpoint_*.pt")
    }
    if requested == "final" and "final" not in kinds and len(kinds) == 1:
        return kinds.pop()
    return requested


@dataclass(frozen=True)
class _Run:
    inputs: str | Path | Sequence[str | Path]
    output_dir: Path
    dataset: str | int | None
    labels: str | None
    settings: PredictionSettings
    resume: bool
    device: str
    show_progress: bool


def _postprocessing(
    model_dirs: Sequence[Path], dataset: str | int | None, predictor: Predictor, settings: PredictionSettings
) -> tuple[dict | None, int | None]:
    """``(rules, min_component_size)`` for ``--postprocess``: the decided rules, else a learned size."""
    if not settings.postprocess or settings.min_component_size is not None:
        return None, settings.min_component_size
    decision = read_decision(model_dirs)
    if decision is not None:
        return decision["rules_raw"], None
    stored = model_dirs[0] / DECISION_FILE
    if dataset is None and not (stored.is_file() and "min_component_size" in io.read_json(stored)):
        raise InputError(
            f"--postprocess: {model_dirs[0]} holds no postprocessing decision for these models; run "
            "mipseg_find_best_configuration before exporting, or pass --min-component-size N"
        )
    labelset = model_dirs[0].name.split("__")[1]
    plans = predictor.plans
    return None, export.learned_min_component_size(
        model_dirs[0], dataset or model_dirs[0].parent.name, labelset, plans, plans.ignore_label
    )


def _predict(model_dirs: list[Path], run: _Run, num_parts: int, part_id: int) -> list[Path]:
    settings, output_dir = run.settings, run.output_dir
    predictor = load_predictor(model_dirs, settings, run.device)
    spec = predictor.dataset_json
    input_list = [run.inputs] if isinstance(run.inputs, str | Path) else list(run.inputs)
    cases = discover_cases(input_list, len(spec["channel_names"]), spec["file_ending"])
    selected = select_part(cases, num_parts, part_id)
    rules, min_component_size = _postprocessing(model_dirs, run.dataset, predictor, settings)

    output_dir.mkdir(parents=True, exist_ok=True)
    io.remove_stale_partials(output_dir, [case.case_id for case in selected])  # other parts keep theirs
    args = {
        "inputs": [str(p) for p in input_list],
        "dataset": None if run.dataset is None else str(run.dataset),
        "folds": None if settings.folds is None else [str(f) for f in settings.folds],
        "labels": run.labels,
        "trainer": settings.trainer,
        "checkpoint": settings.checkpoint,
        "step_size": settings.step_size,
        "tta": settings.tta,
        "batch_size": settings.batch_size,
        "save_probabilities": settings.save_probabilities,
        "postprocess": settings.postprocess,
        "postprocessing_rules": rules,
        "continue": run.resume,
        "num_parts": num_parts,
        "part_id": part_id,
        "device": run.device,
        "engine": settings.engine,
        "precision": settings.precision,
    }
    _write_run_files(output_dir, model_dirs, predictor, args, min_component_size)

    problems = [f"{case.problem}" for case in selected if case.problem]
    todo = [case for case in selected if case.problem is None]
    finished = []
    if run.resume:
        finished = [c for c in todo if case_is_done(output_dir, c.case_id, settings.save_probabilities)]
        todo = [c for c in todo if c not in finished]
        finished = [export.segmentation_path(output_dir, c.case_id) for c in finished]
    postprocessing = {"min_component_size": min_component_size, "rules": rules}
    written = _run_pipeline(
        todo, output_dir, predictor, settings.save_probabilities, postprocessing, problems, run.show_progress
    )
    if todo:  # the engine --engine auto chose is known once the first case was seen
        _write_run_files(output_dir, model_dirs, predictor, args, min_component_size)
    if problems:
        raise InputError([f"{len(problems)} case(s) could not be predicted:"] + problems)
    return sorted(finished + written)


def _write_run_files(
    output_dir: Path,
    model_dirs: Sequence[Path],
    predictor: Predictor,
    args: dict[str, Any],
    min_component_size: int | None,
) -> None:
    io.write_json(predictor.plans.to_json(), output_dir / "plans.json")
    io.write_json(predictor.dataset_json, output_dir / "dataset.json")
    args.update(
        model_dir=str(model_dirs[0]),
        model_dirs=[str(d) for d in model_dirs],
        folds_used=len(predictor.networks),
        mirror_axes=list(predictor.mirror_axes),
        batch_size_used=predictor.batch_size,
        device_used=str(predictor.device),
        engine_used=predictor.engine,
        min_component_size=min_component_size,
        ensembling="mean of per-fold softmax probabilities",
    )
    io.write_json(args, output_dir / "predict_args.json")


def _run_pipeline(
    todo: list[InputCase],
    output_dir: Path,
    predictor: Predictor,
    save_probabilities: bool,
    postprocessing: dict[str, Any],
    problems: list[str],
    show_progress: bool,
) -> list[Path]:
    """Load case i+1 while predicting case i while writing case i-1; append per-case problems."""
    written: list[Path] = []
    exports: deque[Future] = deque()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="mipseg-load") as loader,
        ThreadPoolExecutor(1, thread_name_prefix="mipseg-export") as writer,
        progress_bar(show_progress) as bars,
    ):
        cases_bar = bars.add_task("cases", total=len(todo))
        pending = loader.submit(_load_and_preprocess, todo[0], predictor.plans) if todo else None
        for index, case in enumerate(todo):
            current = pending
            if index + 1 < len(todo):
                pending = loader.submit(_load_and_preprocess, todo[index + 1], predictor.plans)
            try:
                data, properties = current.result()
            except InputError as error:
                problems.extend(f"{case.case_id}: {problem}" for problem in error.problems)
                bars.advance(cases_bar)
                continue
            tiles_bar = bars.add_task(f"  {case.case_id}", total=predictor.number_of_tiles(data.shape[1:]))
            probabilities = predictor.predict_preprocessed(data, lambda n, t=tiles_bar: bars.advance(t, n))
            bars.remove_task(tiles_bar)
            exports.append(
                writer.submit(
                    export.export_case,
                    probabilities,
                    properties,
                    predictor.plans,
                    output_dir,
                    case.case_id,
                    labels=predictor.dataset_json["labels"],
                    save_probabilities=save_probabilities,
                    min_component_size=postprocessing["min_component_size"],
                    rules=postprocessing["rules"],
                )
            )
            while len(exports) > MAX_PENDING_EXPORTS:
                written.append(exports.popleft().result())
            bars.advance(cases_bar)
        while exports:
            written.append(exports.popleft().result())
    return written
