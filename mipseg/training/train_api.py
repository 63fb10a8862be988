"""``mipseg_train`` as a Python function: train one fold on one label set, export out-of-fold results.

Reads ``preprocessed/DatasetX/{plans.json, splits.json, data/}`` and writes
``results/DatasetX/{trainer}__{labelset}__3d_fullres/{plans.json, dataset.json, fold_k/}``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mipseg import io, paths
from mipseg.devices import resolve_device
from mipseg.errors import InputError
from mipseg.progress import progress_bar
from mipseg.training import checkpoint as ckpt
from mipseg.training import data as data_module
from mipseg.training import distributed as ddp
from mipseg.training.fold_inputs import FoldInputs, load_init_weights, parse_fold, resolve_inputs
from mipseg.training.loop import (
    TrainingConfig,
    TrainingState,
    check_config,
    make_state,
    resolve_defaults,
    restore_state,
    run_epoch,
    seed_everything,
    state_to_checkpoint,
    unwrap,
)
from mipseg.training.mip_branch import join_checkpoint, split_checkpoint
from mipseg.training.mip_data import attach_mip_targets
from mipseg.training.mip_losses import MipSettings
from mipseg.training.trainer_registry import (
    TRAINERS,
    TrainerComponents,
    mip_axes_of,
    mip_trainer,
    resolve_trainer_name,
)
from mipseg.training.training_log import (
    PLOT_INTERVAL_S,
    epoch_summary,
    foreground_names,
    log_line,
    plot_progress,
)
from mipseg.training.validation import export_validation


@contextlib.contextmanager
def _augmenters(
    inputs: FoldInputs,
    config: TrainingConfig,
    context: ddp.DistributedContext,
    pin: bool,
    start_epoch: int,
    mip_axes: tuple[int, ...] = (),
):
    plans, spec = inputs.plans, inputs.spec
    settings = data_module.augmentation_settings(plans.patch_size, plans.mip_axes)
    crop = data_module.initial_patch_size(plans.patch_size, settings)
    batch_size = ddp.per_rank_batch_size(plans.batch_size, context)
    # distinct streams per process, and a resumed run does not replay the batches of epoch 0
    seed = config.seed + 7919 * context.rank + 100003 * start_epoch
    # validation needs fewer workers (nnU-Net: half, at least one)
    val_workers = max(1, config.num_workers // 2) if config.num_workers > 0 else 0
    loaders = []
    for cases, transform, patch, workers in (
        (
            inputs.train_cases,
            data_module.training_transforms(plans.patch_size, settings, spec.ignore_label),
            crop,
            config.num_workers,
        ),
        (inputs.val_cases, data_module.CentreCropTransform(plans.patch_size), plans.patch_size, val_workers),
    ):
        loader = data_module.PatchLoader(
            cases,
            patch_size=patch,
            batch_size=batch_size,
            foreground_labels=spec.foreground_labels,
            ignore_label=spec.ignore_label,
            oversample_foreground=config.oversample_foreground,
            load_seeds=inputs.has_seeds,
            seed=seed,
            mip_axes=mip_axes,
        )
        loaders.append(
            data_module.make_augmenter(
                loader, transform, num_workers=workers, seed=seed + len(loaders), pin_memory=pin
            )
        )
    try:
        yield loaders[0], loaders[1]
    finally:
        for augmenter in loaders:
            if hasattr(augmenter, "_finish"):
                augmenter._finish()


def train_fold(
    dataset: str | int,
    fold: str | int,
    *,
    labels: str = "pseudo",
    trainer: str = "auto",
    config: TrainingConfig | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    show_progress: bool = True,
    mip_settings: MipSettings | None = None,
) -> Path:
    """Train one fold and export its out-of-fold probabilities; returns ``fold_k``'s folder.

    Parameters
    ----------
    dataset
        Id or name.
    fold
        ``0..4`` (train on the fold's training cases, validate on its validation cases) or
        ``"all"`` (every case; no out-of-fold export).
    labels
        Label set name (``dense`` = labelsTr).
    trainer
        Registered trainer (:data:`TRAINERS`), or ``auto``: ``mip`` for MIP-annotated datasets,
        else ``plain``.
    config
        Epochs, iterations, seed, device, ... (:class:`TrainingConfig`).
    resume
        Continue from ``checkpoint_latest`` (or finish from ``checkpoint_final``): ``--continue``.
    init_from
        Checkpoint to initialise the weights from (fine-tuning).
    show_progress
        Progress bars (epochs, iterations, final validation).
    mip_settings
        Loss weights, projection variant and branch switch of the ``mip`` trainer (default: the
        published ones; a resumed run keeps its checkpoint's).
    """
    trainer = resolve_trainer_name(dataset, trainer)
    if trainer not in TRAINERS:
        raise InputError(f"unknown trainer {trainer!r}; known: {', '.join(sorted(TRAINERS))}")
    if resume and init_from is not None:
        raise InputError("--continue and --init-from exclude each other")
    fold = parse_fold(fold)
    config = config or TrainingConfig()
    check_config(config)
    if mip_settings is not None and mip_settings.problems():
        raise InputError(mip_settings.problems())
    device = resolve_device(config.device)
    context = ddp.init_distributed(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    try:
        return _train(
            dataset,
            fold,
            labels,
            TRAINERS[trainer],
            config,
            device,
            context,
            resume,
            init_from,
            show_progress,
            mip_settings,
        )
    finally:
        ddp.shutdown(context)


def _prepare_mip(inputs: FoldInputs, settings: MipSettings) -> tuple[TrainerComponents, tuple[int, ...]]:
    """The mip trainer's components for this dataset; its cases get their ray targets."""
    axes = mip_axes_of(inputs.plans, inputs.spec)
    if inputs.spec.annotation != "mip" or not axes:
        raise InputError(
            f"trainer 'mip' needs a MIP-annotated dataset (dataset.json annotation 'mip'); "
            f"{inputs.dataset_name} has {inputs.spec.annotation!r}: use --trainer plain"
        )
    inputs.train_cases, inputs.val_cases = attach_mip_targets(
        inputs.dataset_name, inputs.data_dir, inputs.train_cases, inputs.val_cases, axes
    )
    return mip_trainer(settings, axes), axes


def _checkpoint_to_resume(fold_dir: Path) -> dict[str, Any] | None:
    """``checkpoint_latest`` (an unfinished run, newer than any final) or else ``checkpoint_final``."""
    for kind in ("latest", "final"):
        if ckpt.checkpoint_path(fold_dir, kind).is_file():
            return ckpt.load_checkpoint(ckpt.checkpoint_path(fold_dir, kind))
    return None


def _checkpoint(state: TrainingState, extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict; a MIP training network stores only its 3D U-Net as ``network_weights``."""
    return split_checkpoint(unwrap(state.network), state_to_checkpoint(state, extra))


def _restore(state: TrainingState, checkpoint: dict[str, Any]) -> None:
    restore_state(state, join_checkpoint(unwrap(state.network), checkpoint))


def _train(
    dataset,
    fold,
    labels,
    components,
    config,
    device,
    context,
    resume,
    init_from,
    show_progress,
    mip_settings=None,
):
    inputs = resolve_inputs(dataset, fold, labels) if context.is_main else None
    ddp.barrier(context)
    if not context.is_main:
        inputs = resolve_inputs(dataset, fold, labels)
    model_dir = paths.model_dir(inputs.dataset_name, components.name, labels)
    fold_dir = model_dir / f"fold_{fold}"
    log_path = fold_dir / "training_log.txt"
    resume_from = _checkpoint_to_resume(fold_dir) if resume else None
    if resume_from is not None:
        stored = TrainingConfig(**resume_from["config"])
        # the run's settings come from the checkpoint; these may change when resuming
        overrides = {k: getattr(config, k) for k in ("epochs", "iters_per_epoch", "num_workers")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        config = TrainingConfig(**{**stored.to_json(), **overrides, "device": config.device})
        if resume_from.get("mip_settings"):
            mip_settings = MipSettings(**resume_from["mip_settings"])
    config = resolve_defaults(config, device)
    mip_axes: tuple[int, ...] = ()
    if components.name == "mip":
        mip_settings = mip_settings or MipSettings()
        components, mip_axes = _prepare_mip(inputs, mip_settings)
    seed_everything(config.seed + context.rank)
    num_classes, channels = inputs.spec.num_classes, inputs.plans.num_channels
    network = components.build_network(inputs.plans, channels, num_classes, True, config.dropout)
    # every input is checked before the fold folder is touched: a bad --init-from loses nothing
    skipped = (
        load_init_weights(getattr(network, "network3d", network), Path(init_from)) if init_from else None
    )
    state = make_state(network, config, device)
    if resume_from is not None:
        _restore(state, resume_from)
    if context.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        inputs.plans.save(model_dir / "plans.json")
        io.write_json(inputs.dataset_json, model_dir / "dataset.json")
        if resume and resume_from is None:
            log_line(log_path, "--continue: no checkpoint found, starting from scratch")
        if resume_from is None:
            # a fresh run trains beside the finished model: checkpoint_final.pt stays until the new one
            # replaces it (atomically, at the end); only an unfinished run's checkpoint_latest goes,
            # so that --continue never resumes it by mistake
            ckpt.checkpoint_path(fold_dir, "latest").unlink(missing_ok=True)
            log_line(log_path, f"training {components.name} on label set {labels!r}, fold {fold}: {config}")
        if skipped is not None:
            log_line(
                log_path,
                f"initialised from {init_from}" + (f" (new seg heads: {skipped})" if skipped else ""),
            )
        if resume_from is not None:
            log_line(log_path, f"resumed at epoch {state.epoch}")
    if context.enabled:
        state.network = nn.parallel.DistributedDataParallel(
            state.network, device_ids=[device.index] if device.type == "cuda" else None
        )
    extra = {
        "trainer": components.name,
        "labelset": labels,
        "fold": fold,
        "plans": inputs.plans.to_json(),
        "dataset_json": inputs.dataset_json,
        "num_input_channels": channels,
        "num_classes": num_classes,
        "mirror_axes": list(
            data_module.augmentation_settings(inputs.plans.patch_size, inputs.plans.mip_axes).mirror_axes
        ),
    }
    if components.name == "mip":
        extra["mip_settings"] = mip_settings.to_json()
        extra["mip_axes"] = list(mip_axes)
    loss_fn = components.build_loss(inputs.plans, inputs.spec, config)
    if state.epoch < config.epochs:
        _loop(state, inputs, loss_fn, extra, fold_dir, log_path, context, device, show_progress, mip_axes)
    if context.is_main:
        final = ckpt.save_checkpoint(_checkpoint(state, extra), ckpt.checkpoint_path(fold_dir, "final"))
        log_line(log_path, f"training done after {state.epoch} epochs: {final.name}")
        if fold != "all":
            _final_validation(state, inputs, fold_dir, device, log_path, show_progress)
        # the run is complete only now: until here checkpoint_latest makes --continue redo the export
        ckpt.checkpoint_path(fold_dir, "latest").unlink(missing_ok=True)
    ddp.barrier(context)
    return fold_dir


def _loop(state, inputs, loss_fn, extra, fold_dir, log_path, context, device, show_progress, mip_axes=()):
    config = state.config
    plotted_at = 0.0
    with (
        _augmenters(inputs, config, context, device.type == "cuda", state.epoch, mip_axes) as (
            train_batches,
            val_batches,
        ),
        progress_bar(show_progress and context.is_main, transient=True) as bar,
    ):
        session_epochs = state.epoch  # the ETA averages the epochs of this session only
        epochs = bar.add_task("epochs", total=config.epochs, completed=state.epoch)
        iterations = bar.add_task("iterations", total=config.iters_per_epoch)
        try:
            while state.epoch < config.epochs:
                bar.reset(iterations, total=config.iters_per_epoch)
                result = run_epoch(
                    state,
                    train_batches,
                    val_batches,
                    loss_fn,
                    num_classes=inputs.spec.num_classes,
                    ignore_label=inputs.spec.ignore_label,
                    has_seeds=inputs.has_seeds,
                    reduce_counts=lambda counts: ddp.sum_counts(counts, context),
                    reduce_mean=lambda value: ddp.mean_value(value, context),
                    on_iteration=lambda i: bar.update(iterations, completed=i + 1),
                )
                bar.update(epochs, completed=state.epoch)
                if context.is_main:
                    line = _summary(state, result, extra, session_epochs)
                    _after_epoch(state, result, extra, fold_dir, log_path, line)
                    if show_progress:  # above the bars in a terminal, one plain line each when redirected
                        print(line, flush=True)
                    # plotting takes about a second on CPU: at most every PLOT_INTERVAL_S, and at the end
                    if time.time() - plotted_at > PLOT_INTERVAL_S or state.epoch >= config.epochs:
                        plot_progress(state.log, fold_dir / "progress.png")
                        plotted_at = time.time()
        except KeyboardInterrupt:
            if context.is_main:
                ckpt.save_checkpoint(_checkpoint(state, extra), ckpt.checkpoint_path(fold_dir, "latest"))
                log_line(log_path, f"interrupted during epoch {state.epoch}; checkpoint_latest written")
                # the picture last: Ctrl-C during matplotlib's first import leaves it half-imported
                with contextlib.suppress(Exception):
                    plot_progress(state.log, fold_dir / "progress.png")
            raise


def _summary(state: TrainingState, result: dict[str, Any], extra, session_start: int) -> str:
    """The epoch's console line; ETA = epochs left x mean epoch time of this session."""
    times = state.log.epoch_time[session_start:]
    eta = (state.config.epochs - state.epoch) * sum(times) / max(len(times), 1)
    names = foreground_names(extra["dataset_json"]["labels"])
    return epoch_summary(result, state.config.epochs, names, eta)


def _after_epoch(
    state: TrainingState, result: dict[str, Any], extra, fold_dir: Path, log_path: Path, line: str
) -> None:
    log_line(log_path, line)  # the console's line, so a --quiet run's log reads like its terminal
    if result["new_best"]:
        ckpt.save_checkpoint(_checkpoint(state, extra), ckpt.checkpoint_path(fold_dir, "best"))
        log_line(log_path, f"new best EMA pseudo Dice {result['ema']:.4f}: checkpoint_best written")
    last = state.epoch >= state.config.epochs
    # after the last epoch too: an interruption during the final export resumes without retraining
    if state.epoch % state.config.save_every == 0 or last:
        ckpt.save_checkpoint(_checkpoint(state, extra), ckpt.checkpoint_path(fold_dir, "latest"))


def _final_validation(
    state, inputs: FoldInputs, fold_dir: Path, device, log_path: Path, show_progress: bool
) -> None:
    network = unwrap(state.network)
    network = getattr(network, "network3d", network)  # prediction runs the 3D network alone
    network.deep_supervision = False
    case_ids = [c.case_id for c in inputs.val_cases]
    with progress_bar(show_progress, transient=True) as bar:
        task = bar.add_task("validation", total=len(case_ids))
        summary = export_validation(
            network,
            case_ids,
            data_dir=inputs.data_dir,
            labelset_dir=inputs.labelset_dir,
            dense_dir=inputs.dense_dir,
            output_dir=fold_dir / "validation",
            patch_size=inputs.plans.patch_size,
            device=device,
            num_classes=inputs.spec.num_classes,
            foreground_labels=inputs.spec.foreground_labels,
            ignore_label=inputs.spec.ignore_label,
            on_case_done=lambda _case: bar.advance(task),
        )
    network.deep_supervision = True
    log_line(log_path, f"validation of {len(case_ids)} cases: {summary['mean']}")
