"""Ship a model: export -> install -> predict, predict from a model folder without the dataset, bad zips."""

from __future__ import annotations

import dataclasses
import io as io_module
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import tiny_plans, write_tiny_dataset

from mipseg.cli.export_model import main as export_main
from mipseg.cli.install_model import main as install_main
from mipseg.cli.predict import main as predict_main
from mipseg.inference.model_package import read_manifest
from mipseg.planning.planner import default_resampling
from mipseg.training.loop import TrainingConfig
from mipseg.training.train_api import train_fold

torch.set_num_threads(1)
MODEL = "plain__pseudo__3d_fullres"


def _exit_code(main, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


def _trained(data_roots) -> str:
    """The tiny dataset of the training tests with fold 0 trained on the smallest budget they use."""
    plans = dataclasses.replace(tiny_plans(patch_size=(16, 32, 32)), resampling=default_resampling())
    name = write_tiny_dataset(data_roots, plans=plans)  # prediction needs the resampling orders
    config = TrainingConfig(
        epochs=2, iters_per_epoch=2, val_iters=1, num_workers=0, device="cpu", save_every=1
    )
    train_fold(name, 0, config=config, show_progress=False)
    return name


def _predict(argv: list[str], output: Path) -> dict[str, bytes]:
    code = _exit_code(predict_main, [*argv, "-o", str(output), "--disable-tta", "--disable-progress-bar"])
    assert code == 0
    return {p.name: p.read_bytes() for p in sorted(output.glob("*.nii.gz"))}


def _label_maps(files: dict[str, bytes], folder: Path) -> dict[str, np.ndarray]:
    from mipseg import io

    return {name: io.read_image(folder / name)[0] for name in files}


def test_export_install_predict_gives_identical_label_maps(data_roots, tmp_path: Path) -> None:
    name = _trained(data_roots)
    images = data_roots["raw"] / name / "imagesTr"
    before = _predict(["-i", str(images), "-d", name], tmp_path / "before")
    assert len(before) == 4
    package = tmp_path / "ship" / "model.zip"
    assert _exit_code(export_main, ["-d", name, "-o", str(package)]) == 0
    manifest = read_manifest(package)
    assert manifest["models"] == [f"{name}/{MODEL}"] and manifest["folds"] == ["0"]
    assert f"{name}/{MODEL}/fold_0/checkpoint_final.pt" in manifest["files"]
    with zipfile.ZipFile(package) as archive:  # nothing but what prediction needs
        assert not any("validation" in n or "training_log" in n for n in archive.namelist())
        stored = archive.read(f"{name}/{MODEL}/fold_0/checkpoint_final.pt")
    packed = torch.load(io_module.BytesIO(stored), weights_only=False)
    assert "optimizer_state" not in packed and "rng_state" not in packed and "network_weights" in packed
    original = data_roots["results"] / name / MODEL / "fold_0" / "checkpoint_final.pt"
    assert len(stored) < 0.6 * original.stat().st_size  # no momentum buffers

    shutil.rmtree(data_roots["results"])
    assert _exit_code(install_main, [str(package)]) == 0
    assert (data_roots["results"] / name / MODEL / "fold_0" / "checkpoint_final.pt").is_file()
    after = _predict(["-i", str(images), "-d", name], tmp_path / "after")
    assert after == before  # byte-identical files
    # the maps compared are not trivial: each holds vessel and background
    assert all(set(np.unique(v)) == {0, 1} for v in _label_maps(before, tmp_path / "before").values())
    from_zip = _predict(["-i", str(images), "-m", str(package)], tmp_path / "from_zip")
    assert _label_maps(from_zip, tmp_path / "from_zip").keys() == before.keys()
    for case, array in _label_maps(from_zip, tmp_path / "from_zip").items():
        assert np.array_equal(array, _label_maps(before, tmp_path / "before")[case])
    # installing again is refused without --force, and allowed with it
    assert _exit_code(install_main, [str(package)]) == 2
    assert _exit_code(install_main, [str(package), "--force"]) == 0


def test_predict_from_model_folder_without_dataset_roots(data_roots, tmp_path: Path, monkeypatch) -> None:
    name = _trained(data_roots)
    images = tmp_path / "images"
    shutil.copytree(data_roots["raw"] / name / "imagesTr", images)
    expected = _predict(["-i", str(images), "-d", name], tmp_path / "expected")
    model = tmp_path / "elsewhere" / MODEL
    shutil.copytree(data_roots["results"] / name / MODEL, model)
    for root in ("raw", "preprocessed", "results"):
        shutil.rmtree(data_roots[root])
    monkeypatch.delenv("MIPSEG_RAW")
    monkeypatch.delenv("MIPSEG_PREPROCESSED")
    monkeypatch.chdir(tmp_path)
    got = _predict(["-i", str(images), "-m", str(model)], tmp_path / "got")
    assert got == expected
    args = json.loads((tmp_path / "got" / "predict_args.json").read_text())
    assert args["dataset"] is None and args["model_dirs"] == [str(model)]
    # no decision and no dataset to learn one from: one line, exit 2
    assert (
        _exit_code(
            predict_main, ["-i", str(images), "-o", str(tmp_path / "pp"), "-m", str(model), "--postprocess"]
        )
        == 2
    )


def _rewrite(
    source: Path, target: Path, *, drop: str | None = None, manifest_update: dict | None = None
) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.namelist():
            if drop and item.endswith(drop):
                continue
            data = old.read(item)
            if item == "manifest.json" and manifest_update:
                data = json.dumps({**json.loads(data), **manifest_update}).encode()
            new.writestr(item, data)
    return target


def test_bad_packages_get_one_line_and_exit_2(data_roots, tmp_path: Path, capsys) -> None:
    name = _trained(data_roots)
    package = tmp_path / "model.zip"
    assert _exit_code(export_main, ["-d", name, "-o", str(package)]) == 0
    shutil.rmtree(data_roots["results"])
    data = bytearray(package.read_bytes())
    bad = {
        "version": _rewrite(package, tmp_path / "v.zip", manifest_update={"mipseg_version": "9.0.0"}),
        "format": _rewrite(package, tmp_path / "f.zip", manifest_update={"format_version": 99}),
        "checkpoint": _rewrite(package, tmp_path / "c.zip", drop="checkpoint_final.pt"),
        "manifest": _rewrite(package, tmp_path / "m.zip", drop="manifest.json"),
        "truncated": tmp_path / "t.zip",
        "flipped": tmp_path / "x.zip",
    }
    bad["truncated"].write_bytes(bytes(data[: len(data) // 2]))
    middle = len(data) // 2  # inside the stored checkpoint: the zip opens, the checksum differs
    data[middle] ^= 0xFF
    bad["flipped"].write_bytes(bytes(data))
    expected = {
        "version": "mipseg 9.0.0",
        "format": "format 99",
        "checkpoint": "checkpoint",
        "manifest": "not a mipseg model package",
        "truncated": "zip",
        "flipped": "corrupted",
    }
    images = data_roots["raw"] / name / "imagesTr"
    for kind, path in bad.items():
        capsys.readouterr()
        assert _exit_code(install_main, [str(path)]) == 2, kind
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) == 1 and expected[kind] in message, (kind, message)
        out = tmp_path / f"out_{kind}"
        assert _exit_code(predict_main, ["-i", str(images), "-o", str(out), "-m", str(path)]) == 2, kind
    assert not (data_roots["results"] / name).exists()  # nothing was installed


def test_best_configuration_travels_with_the_package(data_roots, tmp_path: Path) -> None:
    from mipseg.cli.find_best_configuration import main as find_main

    name = _trained(data_roots)
    assert _exit_code(find_main, ["-d", name]) == 0
    decision = json.loads((data_roots["results"] / name / MODEL / "postprocessing.json").read_text())
    assert decision["decided_for"] == [MODEL] and "rules_raw" in decision
    package = tmp_path / "model.zip"
    assert _exit_code(export_main, ["-d", name, "-o", str(package)]) == 0  # the winner, by default
    assert f"{name}/{MODEL}/postprocessing.json" in read_manifest(package)["files"]
    images = data_roots["raw"] / name / "imagesTr"
    out = tmp_path / "out"
    _predict(["-i", str(images), "-m", str(package), "--postprocess"], out)
    args = json.loads((out / "predict_args.json").read_text())
    assert args["postprocessing_rules"] == decision["rules_raw"]


def test_challenge_entry_script_on_folders(data_roots, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from mipseg import io

    name = _trained(data_roots)
    expected_dir = tmp_path / "expected"
    images = str(data_roots["raw"] / name / "imagesTr")
    # the container predicts with the defaults (mirroring on)
    assert (
        _exit_code(
            predict_main, ["-i", images, "-o", str(expected_dir), "-d", name, "--disable-progress-bar"]
        )
        == 0
    )
    package = tmp_path / "model.zip"
    assert _exit_code(export_main, ["-d", name, "-o", str(package)]) == 0
    inputs = tmp_path / "input" / "images" / "head-mra"  # the challenge convention, one .mha per case
    for image in sorted((data_roots["raw"] / name / "imagesTr").glob("*.nii.gz")):
        array, geometry = io.read_image(image)
        io.write_image(array, geometry, inputs / f"{image.name[: -len('_0000.nii.gz')]}.mha")
    (inputs / "._case_000.mha").write_bytes(b"\x00\x05\x16\x07")  # a macOS copy's sidecar: no image
    output = tmp_path / "output" / "images"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPSEG_")}  # no dataset roots
    env.update(OMP_NUM_THREADS="1", MIPSEG_CACHE=str(tmp_path / "cache"))
    entry = Path(__file__).resolve().parents[1] / "container" / "entrypoint.py"
    argv = [
        sys.executable,
        str(entry),
        "--input",
        str(tmp_path / "input" / "images"),
        "--output",
        str(output),
    ]
    done = subprocess.run(
        [*argv, "--model", str(package)], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    written = sorted(output.rglob("*.mha"))
    assert [p.relative_to(output).as_posix() for p in written] == [
        f"head-mra/case_{i:03d}.mha" for i in range(4)
    ]
    for path in written:
        label_map, geometry = io.read_image(path)
        reference, reference_geometry = io.read_image(expected_dir / f"{path.stem}.nii.gz")
        assert np.array_equal(label_map, reference) and geometry.matches(reference_geometry)
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run(
        [sys.executable, str(entry), "--input", str(empty), "--output", str(output), "--model", str(package)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1


def test_predict_m_uses_the_packaged_checkpoint_and_refuses_model_choice_flags(
    data_roots, tmp_path: Path
) -> None:
    name = _trained(data_roots)
    images = data_roots["raw"] / name / "imagesTr"
    fold = data_roots["results"] / name / MODEL / "fold_0"
    expected = _predict(["-i", str(images), "-d", name], tmp_path / "expected")
    shutil.move(fold / "checkpoint_final.pt", fold / "checkpoint_best.pt")  # only a best checkpoint
    package = tmp_path / "best.zip"
    assert _exit_code(export_main, ["-d", name, "-o", str(package), "--checkpoint", "best"]) == 0
    assert read_manifest(package)["checkpoint"] == "best"
    # no -chk: the package's own checkpoint kind is used, not "final"
    got = _predict(["-i", str(images), "-m", str(package)], tmp_path / "got")
    assert _label_maps(got, tmp_path / "got").keys() == expected.keys()
    for case, array in _label_maps(got, tmp_path / "got").items():
        assert np.array_equal(array, _label_maps(expected, tmp_path / "expected")[case])
    for flags in (["--trainer", "plain"], ["--labels", "pseudo"]):  # -m already fixes the model
        argv = ["-i", str(images), "-o", str(tmp_path / "refused"), "-m", str(package), *flags]
        assert _exit_code(predict_main, argv) == 2
    assert not (tmp_path / "refused").exists()
