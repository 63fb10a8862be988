"""mipseg_predict: segment new images with the fold ensemble of a trained model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mipseg.cli._common import DebugOption, DeviceOption, console, make_app, reported_errors

app = make_app(
    "Predict {case}.nii.gz for every case of IN (a folder of {case}_{XXXX} channel files, or files) "
    "with the ensemble of a trained model's folds; outputs keep the input geometry exactly."
)


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Option("-i", "--input", help="Input folder, or channel files (repeat -i or list them)."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    dataset: Annotated[
        str | None,
        typer.Option("-d", "--dataset", help="Dataset id (900) or name whose trained model to use."),
    ] = None,
    models: Annotated[
        list[Path] | None,
        typer.Option(
            "-m",
            "--model",
            help="Instead of -d: a model package (.zip) or model folder; several are ensembled.",
        ),
    ] = None,
    folds: Annotated[
        list[str] | None,
        typer.Option("-f", "--folds", help="Folds to ensemble (0..4 or all); default: every trained fold."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Label set the model was trained on; default: the only one."),
    ] = None,
    trainer: Annotated[
        str | None,
        typer.Option("-tr", "--trainer", help="Trainer name; default: mip for MIP datasets, else plain."),
    ] = None,
    checkpoint: Annotated[
        str, typer.Option("-chk", "--checkpoint", help="best, final or latest (or checkpoint_final.pth).")
    ] = "final",
    step_size: Annotated[
        float, typer.Option("--step-size", help="Sliding-window step as a fraction of the patch.")
    ] = 0.5,
    disable_tta: Annotated[
        bool, typer.Option("--disable-tta", help="No mirroring test-time augmentation (8x faster).")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Tiles per forward pass; default: plans on CUDA, 2 on CPU."),
    ] = None,
    save_probabilities: Annotated[
        bool, typer.Option("--save-probabilities", help="Also write {case}.npz (float16 probabilities).")
    ] = False,
    postprocess: Annotated[
        bool,
        typer.Option(
            "--postprocess",
            help=(
                "Apply the per-class rules mipseg_find_best_configuration decided; without a decision, "
                "remove connected components smaller than a minimum size."
            ),
        ),
    ] = False,
    min_component_size: Annotated[
        int | None,
        typer.Option(
            "--min-component-size",
            help="Remove components smaller than this (voxels); given, it applies even without "
            "--postprocess. With --postprocess and no value: learned from the folds.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--continue", help="Skip cases whose outputs already exist.")
    ] = False,
    num_parts: Annotated[int, typer.Option("--num-parts", help="Split the cases into this many parts.")] = 1,
    part_id: Annotated[int, typer.Option("--part-id", help="Which part (0-based) this call predicts.")] = 0,
    device: DeviceOption = "auto",
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help=(
                "CPU inference engine: auto (OpenVINO when installed and the volume needs >= 256 network "
                "passes per fold or the conversion is cached, else torch), torch or openvino."
            ),
        ),
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option("--precision", help="float32, or bfloat16 (faster on CPUs with AVX512-BF16/AMX)."),
    ] = "float32",
    no_progress: Annotated[bool, typer.Option("--disable-progress-bar", help="No progress bars.")] = False,
    debug: DebugOption = False,
) -> None:
    """Predict OUT/{case}.nii.gz for every case of IN with the fold ensemble of a trained model.

    The model: -d DATASET (its results tree), or -m MODEL (a package from mipseg_export_model or a
    model folder; no raw or preprocessed dataset needed).

    IN: a folder of {case}_{XXXX} channel files, or a list of files. Outputs keep the input geometry.

    Unreadable cases are listed at the end (exit 2); the others are still predicted.
    """
    from mipseg.inference.predict_api import PredictionSettings, predict_folder

    with reported_errors(debug):
        settings = PredictionSettings(
            folds=tuple(folds) if folds else None,
            trainer=trainer,
            checkpoint=checkpoint,
            step_size=step_size,
            tta=not disable_tta,
            batch_size=batch_size,
            save_probabilities=save_probabilities,
            postprocess=postprocess,
            min_component_size=min_component_size,
            engine=engine,
            precision=precision,
        )
        written = predict_folder(
            inputs[0] if len(inputs) == 1 else inputs,
            output,
            dataset,
            models=models,
            labels=labels,
            settings=settings,
            resume=resume,
            num_parts=num_parts,
            part_id=part_id,
            device=device,
            show_progress=not no_progress,
        )
    console.print(f"{len(written)} segmentation(s) in {output}", highlight=False)


MULTI_VALUE_OPTIONS = ("-i", "--input", "-f", "--folds", "-m", "--model")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Turn nnU-Net style ``-f 0 1 2`` / ``-i a b`` into click's ``-f 0 -f 1 -f 2``.

    Click options take one value each; the contract keeps nnU-Net's space-separated lists, so the
    values following one of :data:`MULTI_VALUE_OPTIONS` up to the next ``-``-prefixed token are
    each given their own copy of the flag.
    """
    expanded: list[str] = []
    current: str | None = None
    given = False
    for token in argv:
        if current is not None and not given and (token.startswith("-") or token in MULTI_VALUE_OPTIONS):
            expanded.append(current)  # a flag without values: let click report it
        if token in MULTI_VALUE_OPTIONS:
            current, given = token, False
        elif token.startswith("-"):
            current = None
            expanded.append(token)
        elif current is not None:
            expanded += [current, token]
            given = True
        else:
            expanded.append(token)
    if current is not None and not given:
        expanded.append(current)
    return expanded


def main(argv: list[str] | None = None) -> None:
    app(
        args=expand_multi_value_options(sys.argv[1:] if argv is None else list(argv)),
        prog_name="mipseg_predict",
    )
