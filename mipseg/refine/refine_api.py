"""``mipseg_refine`` as a Python function: out-of-fold models -> refined label set ``labelsets/{name}``.

Every training case is the validation case of exactly one fold in ``splits.json``; the model of that
fold (``results/DatasetX/{trainer}__{labels}__3d_fullres/fold_k``) never saw it. Per case, streamed
one at a time:

1. deterministic softmax: ``fold_k/validation/{case}.npz`` (exported by mipseg_train) when the
   ``final`` checkpoint is used, else one eval-mode sliding-window pass of the chosen checkpoint;
2. T stochastic passes (dropout on, input + clamped Gaussian noise) in the preprocessed grid;
3. both brought back onto the raw grid (:func:`~mipseg.planning.preprocessing.revert_preprocessing`),
   where the label set lives, so refinement never resamples labels it does not change;
4. the rules of :mod:`mipseg.refine.rules`, then the refined map, a copy of the seeds and the
   report entry are written (atomically; the label map last, so it marks the case finished;
   :class:`~mipseg.labelset.LabelSetWriter` writes the report)::

    labelsets/{name}/{case}.nii.gz  {case}_seeds.nii.gz  labelset.json  report.json
"""

from __future__ import annotations

import shutil
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from mipseg import io, paths
from mipseg.dataset import Case, DatasetSpec, load_dataset
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.labelset import LabelSet, LabelSetWriter, agreement, name_problems
from mipseg.planning.plans import Plans, load_plans
from mipseg.planning.preprocessing import revert_preprocessing
from mipseg.progress import progress_bar
from mipseg.refine import rules as refine
from mipseg.sliding_window import sliding_window_probabilities
from mipseg.training import checkpoint as ckpt

DEFAULT_SOURCE = "pseudo"
DEFAULT_NAME = "refined"


@dataclass(frozen=True)
class RefineSettings:
    """Every rule's constant (published defaults, seed-methods.md A.6) and which models to use."""

    passes: int = refine.PASSES
    noise_std: float = refine.NOISE_STD
    noise_clamp: float = refine.NOISE_CLAMP
    fg_top: float = refine.FG_TOP
    bg_top: float = refine.BG_TOP
    max_distance: float = refine.MAX_DISTANCE
    body_threshold: float = refine.BODY_THRESHOLD
    cl_method: str = "confident_joint"
    trainer: str = "auto"
    checkpoint: str = "final"
    seed: int = 0

    def problems(self) -> list[str]:
        """One line per invalid setting."""
        found = []
        if self.passes < 1:
            found.append(f"--passes must be >= 1, got {self.passes}")
        if self.noise_std < 0 or self.noise_clamp < 0:
            found.append(
                f"--noise-std and --noise-clamp must be >= 0, got {self.noise_std}, {self.noise_clamp}"
            )
        for flag, value in (("--fg-top", self.fg_top), ("--bg-top", self.bg_top)):
            if not 0 <= value <= 1:
                found.append(f"{flag} must be in [0, 1], got {value}")
        if self.max_distance < 0:
            found.append(f"--max-distance must be >= 0, got {self.max_distance}")
        if self.cl_method not in refine.CL_METHODS:
            found.append(f"--cl-method must be one of {', '.join(refine.CL_METHODS)}, got {self.cl_method!r}")
        if self.checkpoint not in ("final", "best"):
            found.append(f"--checkpoint must be final or best, got {self.checkpoint!r}")
        return found

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FoldModel:
    """Where one case's out-of-fold model lives."""

    fold: int
    fold_dir: Path
    checkpoint: Path


class MonteCarloDropout(nn.Module):
    """Wraps a network so its dropout layers sample even in eval mode (norms stay in eval mode).

    The sliding window switches its network to eval mode; this wrapper turns only the dropout
    modules back on at every forward, unlike the published ``model.train()`` which would also
    change batch-norm behaviour.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> Any:
        for module in self.network.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.train()
        return self.network(x)


def refine_labelset(
    dataset: str | int,
    labels: str = DEFAULT_SOURCE,
    name: str = DEFAULT_NAME,
    *,
    settings: RefineSettings | None = None,
    device: str = "auto",
    resume: bool = False,
    show_progress: bool = True,
) -> Path:
    """Refine label set ``labels`` of every training case into label set ``name``; returns its folder.

    Raises
    ------
    InputError
        Bad settings or names, no plans / splits / preprocessed data, source label files missing, or
        a case whose fold has no trained model (all problems listed together).
    """
    settings = settings or RefineSettings()
    problems = settings.problems() + name_problems(name, also_reserved=(labels,))
    if problems:
        raise InputError(problems)
    torch_device = resolve_device(device)
    loaded = load_dataset(dataset, read_voxels=False)
    if settings.trainer == "auto":  # as mipseg_train's default: mip for MIP-annotated datasets
        from mipseg.training.trainer_registry import resolve_trainer_name

        settings = replace(settings, trainer=resolve_trainer_name(loaded.name, "auto"))
    preprocessed = paths.preprocessed_dataset_dir(loaded.name)
    plans = load_plans(preprocessed / "plans.json")
    source = LabelSet(loaded.name, labels)
    models = locate_fold_models(loaded.name, loaded.case_ids, labels, settings)
    problems = [
        f"{source.label_path(c)}: label file missing"
        for c in loaded.case_ids
        if not source.label_path(c).is_file()
    ]
    problems += [
        f"{preprocessed / 'data' / f'{c}.npy'}: case not preprocessed; run mipseg_plan first"
        for c in loaded.case_ids
        if not (preprocessed / "data" / f"{c}.npy").is_file()
    ]
    if problems:
        raise InputError(problems[:10])

    labelset = LabelSet(loaded.name, name)
    warnings = _dropout_warnings(models)
    for line in warnings:
        Console(stderr=True).print(f"[yellow]warning:[/] {line}", highlight=False)
    writer = LabelSetWriter(
        labelset,
        labelset_description(source, loaded.spec, settings),
        resume=resume,
        header={"warnings": warnings},
        agreement_keys=("agreement", "source_agreement"),
    )
    todo = [c for c in loaded.cases if not writer.finished(c.case_id)]
    # still drawn nowhere in those cases: the refined set's background may hold them as much as the source's
    undrawn = source.undrawn_classes()
    with progress_bar(show_progress, transient=True) as bar:
        task = bar.add_task(
            f"refine {loaded.name}", total=len(loaded.cases), completed=len(loaded.cases) - len(todo)
        )
        network_cache: dict[int, tuple[nn.Module, Plans]] = {}
        for case in sorted(todo, key=lambda c: models[c.case_id].fold):  # one model in memory at a time
            model = models[case.case_id]
            if model.fold not in network_cache:
                network_cache.clear()
                checkpoint = ckpt.load_checkpoint(model.checkpoint)
                network = ckpt.network_from_checkpoint(checkpoint).to(torch_device)
                network_cache[model.fold] = (network, Plans.from_json(checkpoint["plans"]))
            network, model_plans = network_cache[model.fold]
            entry = refine_case(
                case,
                loaded.spec,
                plans,
                network,
                model_plans.patch_size,
                model,
                data_dir=preprocessed / "data",
                source=source,
                output=writer.target,  # beside a finished set until close
                settings=settings,
                device=torch_device,
            )
            if case.case_id in undrawn:
                entry["undrawn_classes"] = list(undrawn[case.case_id])
            writer.add_case(case.case_id, entry)
            bar.advance(task)
    writer.close(loaded.case_ids)
    return labelset.folder


def labelset_description(source: LabelSet, spec: DatasetSpec, settings: RefineSettings) -> dict[str, Any]:
    """``labelset.json``: the source set's description (values, seeds) with this stage's provenance.

    The source's own ``settings`` are kept as ``source_settings``.
    """
    description = io.read_json(source.description_path) if source.description_path.is_file() else {}
    if "settings" in description:
        description["source_settings"] = description.pop("settings")
    description.pop("made_from", None)
    description.update(
        {
            "made_by": "mipseg_refine (confident learning + uncertainty, Guo et al. IEEE TMI 2024)",
            "labels": {**spec.class_labels, "ignore": spec.ignore_label},
            "ignore": spec.ignore_label,
            "settings": settings.to_json(),
            "made_from": {"labelset": source.name},
        }
    )
    return description


def locate_fold_models(
    dataset: str, case_ids: list[str], labels: str, settings: RefineSettings
) -> dict[str, FoldModel]:
    """The out-of-fold model of every case: the fold of ``splits.json`` whose ``val`` holds it.

    Raises
    ------
    InputError
        No splits, a case in no validation split, or a needed fold without its checkpoint.
    """
    splits_path = paths.preprocessed_dataset_dir(dataset) / "splits.json"
    if not splits_path.is_file():
        raise InputError(f"{splits_path}: not found; run mipseg_plan for this dataset first")
    splits = io.read_json(splits_path)
    model_dir = paths.model_dir(dataset, settings.trainer, labels)
    models, problems, missing_folds = {}, [], set()
    for case_id in case_ids:
        fold = next((k for k, split in enumerate(splits) if case_id in split.get("val", [])), None)
        if fold is None:
            problems.append(f"{splits_path}: case {case_id} is in no fold's validation set")
            continue
        fold_dir = model_dir / f"fold_{fold}"
        path = ckpt.checkpoint_path(fold_dir, settings.checkpoint)
        if not path.is_file():
            missing_folds.add(fold)
            continue
        models[case_id] = FoldModel(fold, fold_dir, path)
    for fold in sorted(missing_folds):
        path = ckpt.checkpoint_path(model_dir / f"fold_{fold}", settings.checkpoint)
        problems.append(
            f"{path}: fold {fold} has no trained model; run mipseg_train -d {dataset} -f {fold} "
            f"--labels {labels} --trainer {settings.trainer} --dropout 0.3"
        )
    if problems:
        raise InputError(problems)
    return models


def refine_case(
    case: Case,
    spec: DatasetSpec,
    plans: Plans,
    network: nn.Module,
    patch_size: list[int],
    model: FoldModel,
    *,
    data_dir: Path,
    source: LabelSet,
    output: LabelSet,
    settings: RefineSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Refine one case and write its label map and seeds; returns its report entry.

    ``data_dir`` = ``preprocessed/DatasetX/data``; ``source`` / ``output`` = the source and refined
    label sets; ``model`` = the case's out-of-fold model, ``network`` its network.
    """
    started = time.time()
    image = np.load(data_dir / f"{case.case_id}.npy")
    properties = io.read_json(data_dir / f"{case.case_id}.json")
    num_classes = spec.num_classes
    deterministic = _deterministic_probabilities(
        case.case_id, image, network, patch_size, num_classes, model, settings, device
    )
    case_seed = settings.seed + zlib.crc32(case.case_id.encode()) % (2**31 - 1)
    stochastic = stochastic_mean_probabilities(
        network,
        image,
        patch_size,
        num_classes,
        device,
        passes=settings.passes,
        noise_std=settings.noise_std,
        noise_clamp=settings.noise_clamp,
        seed=case_seed,
    )
    del image
    deterministic = revert_preprocessing(deterministic, properties, plans)
    stochastic = revert_preprocessing(stochastic, properties, plans)

    labels, geometry = io.read_image(source.label_path(case.case_id))
    if list(labels.shape) != list(deterministic.shape[1:]):
        raise InputError(
            f"{source.label_path(case.case_id)}: shape {list(labels.shape)} differs from its image "
            f"{list(deterministic.shape[1:])}"
        )
    ignore = spec.ignore_label
    add_foreground, add_background = refine.uncertainty_candidates(
        deterministic,
        stochastic,
        labels,
        ignore,
        fg_top=settings.fg_top,
        bg_top=settings.bg_top,
        max_distance=settings.max_distance,
        spacing=geometry.spacing_zyx,
    )
    del stochastic
    volume, _ = io.read_image(case.images[0], dtype=np.float32)
    considered = (labels != ignore) & refine.body_mask(volume, settings.body_threshold)
    del volume
    given = labels[considered].astype(np.int64)
    probabilities = deterministic[:, considered]
    issues = refine.confident_learning_issues(probabilities, given, method=settings.cl_method)
    cleaned = labels.copy()
    cleaned[considered] = refine.flip_issues(given, issues, probabilities)
    cleaned = refine.keep_foreground_near(labels, cleaned, settings.max_distance, geometry.spacing_zyx)
    del deterministic, probabilities

    seeds_path = source.seeds_path(case.case_id)
    seeds = io.read_image(seeds_path)[0] if seeds_path.is_file() else None
    refined = refine.merge_refinement(
        labels, cleaned, add_foreground, add_background, ignore_label=ignore, seeds=seeds
    ).astype(np.uint8 if ignore < 256 else np.int16)
    classes = sorted(spec.class_labels.values())
    entry: dict[str, Any] = {
        "fold": model.fold,
        "counts": {
            "confident_learning": {"voxels_considered": int(given.size), "flagged": int(issues.sum())},
            "uncertainty": {
                "foreground_added": int((add_foreground > 0).sum()),
                "background_added": int(add_background.sum()),
            },
            "changes": refine.change_counts(labels, refined, ignore, classes),
        },
    }
    if case.label is not None:
        truth, _ = io.read_image(case.label)
        entry["agreement"] = agreement(refined, truth, spec.class_labels)
        entry["source_agreement"] = agreement(labels, truth, spec.class_labels)
    if seeds_path.is_file():
        with io.atomic_path(output.seeds_path(case.case_id)) as tmp:
            shutil.copyfile(seeds_path, tmp)
    io.write_image(refined, geometry, output.label_path(case.case_id))
    entry["seconds"] = round(time.time() - started, 2)
    return entry


def stochastic_mean_probabilities(
    network: nn.Module,
    image: np.ndarray,
    patch_size: list[int],
    num_classes: int,
    device: torch.device,
    *,
    passes: int,
    noise_std: float,
    noise_clamp: float,
    seed: int,
) -> np.ndarray:
    """Mean softmax of ``passes`` sliding-window passes with dropout on and noisy input.

    Noise ``clamp(N(0, noise_std^2), -noise_clamp, noise_clamp)`` is added to the preprocessed
    (normalized) image, one draw per pass over the whole case.

    Parameters
    ----------
    image : np.ndarray float32, shape (C, z, y, x)

    Returns
    -------
    np.ndarray float32, shape (K, z, y, x)
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout masks
    sampler = MonteCarloDropout(network)
    total = None
    for _ in range(passes):
        noise = np.clip(rng.normal(0.0, noise_std, image.shape), -noise_clamp, noise_clamp).astype(np.float32)
        probabilities = sliding_window_probabilities(
            sampler, image + noise, patch_size, num_classes, device=device
        )
        total = probabilities if total is None else total + probabilities
    return total / np.float32(passes)


def _deterministic_probabilities(
    case_id, image, network, patch_size, num_classes, model, settings, device
) -> np.ndarray:
    """The exported out-of-fold softmax when it belongs to the chosen checkpoint, else a fresh pass."""
    exported = model.fold_dir / "validation" / f"{case_id}.npz"
    if settings.checkpoint == "final" and exported.is_file():
        with np.load(exported) as stored:
            probabilities = stored["probabilities"].astype(np.float32)
        if list(probabilities.shape[1:]) == list(image.shape[1:]):
            return probabilities
    return sliding_window_probabilities(network, image, patch_size, num_classes, device=device)


def _dropout_warnings(models: dict[str, FoldModel]) -> list[str]:
    """Folds trained without dropout: their passes vary only by input noise (weaker uncertainty)."""
    lines = []
    for fold, model in sorted({m.fold: m for m in models.values()}.items()):
        if float(ckpt.load_checkpoint(model.checkpoint).get("dropout", 0.0)) <= 0:
            lines.append(
                f"{model.checkpoint}: fold {fold} was trained without dropout; its stochastic passes use "
                "input noise only (train with --dropout 0.3 for the published uncertainty)"
            )
    return lines
