"""mipseg_train: train one fold of the plans' 3D U-Net on a (partial) label set."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from mipseg.cli._common import DatasetOption, DebugOption, DeviceOption, SeedOption, make_app, reported_errors

app = make_app(
    "Train one fold (0-4 or 'all') of the 3D U-Net from the plans on a label set whose unlabelled voxels "
    "carry the ignore value; writes checkpoints, progress.png, training_log.txt and out-of-fold "
    "probabilities under results/DatasetX/{trainer}__{labels}__3d_fullres/fold_k."
)


@app.command()
def train(
    dataset: DatasetOption,
    fold: Annotated[str, typer.Option("-f", "--fold", help="Fold 0..4 of splits.json, or 'all'.")],
    labels: Annotated[
        str, typer.Option("--labels", help="Label set: pseudo, dense (labelsTr), or any labelsets/ name.")
    ] = "pseudo",
    trainer: Annotated[
        str,
        typer.Option(
            "-tr",
            "--trainer",
            help="Network + loss: plain, mip (projection losses + 2D MIP branch), or auto "
            "(mip when dataset.json's annotation is 'mip', else plain).",
        ),
    ] = "auto",
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Epochs (default 1000 on CUDA, 100 on CPU).", min=1)
    ] = None,
    iters_per_epoch: Annotated[
        int | None,
        typer.Option(
            "--iters-per-epoch", help="Training iterations per epoch (default 250 CUDA, 50 CPU).", min=1
        ),
    ] = None,
    val_iters: Annotated[
        int | None,
        typer.Option("--val-iters", help="Validation batches per epoch (default 50 CUDA, 10 CPU).", min=0),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--continue", help="Resume from checkpoint_latest (or finish from final).")
    ] = False,
    init_from: Annotated[
        str | None, typer.Option("--init-from", help="Checkpoint whose weights start the run (fine-tuning).")
    ] = None,
    device: DeviceOption = "auto",
    dropout: Annotated[
        float, typer.Option("--dropout", help="Dropout3d probability at bottleneck and head (0 = off).")
    ] = 0.0,
    seed_weight: Annotated[
        float, typer.Option("--seed-weight", help="Weight of the seed term L_p (skipped without seeds).")
    ] = 1.0,
    skeleton_weight: Annotated[
        float,
        typer.Option(
            "--skeleton-weight",
            help="Weight of the skeleton recall term (soft recall of the labels' tubed skeleton; 0 = off).",
        ),
    ] = 0.0,
    undrawn_classes: Annotated[
        str,
        typer.Option(
            "--undrawn-classes",
            help="Classes a case's drawing left out (propagated label sets record them): 'marginal' "
            "(its background may be them; marginal loss) or 'background' (taken as drawn).",
        ),
    ] = "marginal",
    initial_lr: Annotated[float, typer.Option("--lr", help="Initial learning rate (poly decay).")] = 1e-2,
    num_workers: Annotated[
        int | None,
        typer.Option(
            "--num-workers",
            help="Augmentation worker processes (0 = in-process; default on CUDA min(12, CPUs), "
            "on CPU min(2, CPUs)).",
        ),
    ] = None,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Write checkpoint_latest every N epochs.")
    ] = 10,
    mip_3d_weight: Annotated[
        float, typer.Option("--mip-3d-weight", help="mip trainer: weight of L_3D-MIP (0 = off).", min=0)
    ] = 1.0,
    mip_2d_weight: Annotated[
        float,
        typer.Option("--mip-2d-weight", help="mip trainer: weight of L_MIP, the 2D branch's loss.", min=0),
    ] = 1.0,
    mip_projection: Annotated[
        str,
        typer.Option(
            "--mip-projection", help="mip trainer: 'gather' (at the depth index) or 'max' (along the ray)."
        ),
    ] = "gather",
    mip_branch: Annotated[
        bool, typer.Option("--mip-branch/--no-mip-branch", help="mip trainer: build the 2D MIP branch.")
    ] = True,
    seed: SeedOption = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="No bars, no per-epoch lines (training_log.txt has them).")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Train fold -f of dataset -d on label set --labels."""
    from mipseg.training.loop import TrainingConfig
    from mipseg.training.mip_losses import MipSettings
    from mipseg.training.train_api import train_fold

    with reported_errors(debug):
        config = TrainingConfig(
            epochs=epochs,
            iters_per_epoch=iters_per_epoch,
            val_iters=val_iters,
            initial_lr=initial_lr,
            save_every=save_every,
            num_workers=num_workers,
            seed=seed,
            dropout=dropout,
            seed_weight=seed_weight,
            skeleton_weight=skeleton_weight,
            undrawn_classes=undrawn_classes,
            device=device,
        )
        fold_dir = train_fold(
            dataset,
            fold,
            labels=labels,
            trainer=trainer,
            config=config,
            resume=resume,
            init_from=init_from,
            mip_settings=MipSettings(mip_3d_weight, mip_2d_weight, mip_branch, mip_projection),
            show_progress=not quiet,
        )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        Console().print(f"model written to {fold_dir}", highlight=False, soft_wrap=True)


def main() -> None:
    app()
