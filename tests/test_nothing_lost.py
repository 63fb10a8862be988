"""Nothing finished is lost: bad input, a fresh run, Ctrl-C or a kill never destroy a finished model,
label set or prediction, and ``--continue`` completes the rest. Also: training's per-epoch line."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import tiny_plans, write_tiny_dataset

from mipseg import io
from mipseg.errors import InputError
from mipseg.inference.predict_api import PredictionSettings, predict_folder
from mipseg.labelset import LabelSet
from mipseg.planning.planner import default_resampling
from mipseg.training import checkpoint as ckpt
from mipseg.training import train_api
from mipseg.training.loop import TrainingConfig
from mipseg.training.train_api import train_fold

torch.set_num_threads(1)
BIN = Path(sys.executable).parent
QUICK = [
    "--epochs",
    "2",
    "--iters-per-epoch",
    "1",
    "--val-iters",
    "1",
    "--num-workers",
    "0",
    "--device",
    "cpu",
]


def _config(**overrides) -> TrainingConfig:
    values = dict(epochs=1, iters_per_epoch=1, val_iters=1, num_workers=0, device="cpu")
    values.update(overrides)
    return TrainingConfig(**values)


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def trained(data_roots) -> tuple[str, Path]:
    """A tiny dataset with fold 0 trained (1 epoch of 1 iteration); returns (name, fold_0)."""
    plans = tiny_plans()
    plans.resampling = default_resampling()  # prediction resamples (the identity here)
    name = write_tiny_dataset(data_roots, num_cases=3, plans=plans)
    return name, train_fold(name, 0, config=_config(), show_progress=False)


def test_bad_init_from_leaves_the_fold_byte_identical(trained, tmp_path: Path) -> None:
    name, fold_dir = trained
    before = _snapshot(fold_dir.parent)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for init_from in (tmp_path / "nothere.pt", garbage):
        with pytest.raises(InputError, match="checkpoint"):
            train_fold(name, 0, config=_config(), init_from=init_from, show_progress=False)
    assert _snapshot(fold_dir.parent) == before


def test_fresh_run_interrupted_at_once_keeps_the_old_model_usable(trained, data_roots, monkeypatch) -> None:
    name, fold_dir = trained
    final = fold_dir / "checkpoint_final.pt"
    before = final.read_bytes()
    real_run_epoch = train_api.run_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_api, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_fold(name, 0, config=_config(epochs=3), show_progress=False)
    assert final.read_bytes() == before
    # the unfinished run is what --continue resumes, not the finished one
    assert ckpt.load_checkpoint(fold_dir / "checkpoint_latest.pt")["config"]["epochs"] == 3
    written = predict_folder(
        data_roots["raw"] / name / "imagesTr",
        data_roots["raw"] / "predicted",
        name,
        settings=PredictionSettings(folds=(0,), tta=False),
        device="cpu",
        show_progress=False,
    )
    assert len(written) == 3 and all(p.is_file() for p in written)
    monkeypatch.setattr(train_api, "run_epoch", real_run_epoch)
    train_fold(name, 0, config=_config(epochs=None), resume=True, show_progress=False)
    finished = ckpt.load_checkpoint(final)
    assert finished["epoch"] == 3 and not (fold_dir / "checkpoint_latest.pt").exists()


EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+) train_loss (-?[\d.]+) val_loss (-?[\d.]+) pseudo_dice vessel=([\d.]+|nan) "
    r"ema ([\d.]+|nan) lr ([\d.]+) time ([\d.]+)s eta (\d+:\d\d:\d\d)$"
)


def test_redirected_training_output_has_one_parsable_line_per_epoch(data_roots, tmp_path: Path) -> None:
    name = write_tiny_dataset(data_roots, num_cases=3)
    log = tmp_path / "train.out"
    with open(log, "w") as handle:
        subprocess.run(
            [str(BIN / "mipseg_train"), "-d", name, "-f", "0", "-tr", "plain", *QUICK],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_env(),
            check=True,
        )
    text = log.read_text()
    assert "\x1b" not in text  # no escape codes in a file
    lines = [m for m in map(EPOCH_LINE.match, text.splitlines()) if m]
    assert [(m[1], m[2]) for m in lines] == [("1", "2"), ("2", "2")]
    assert all(float(m[3]) > 0 and 0 <= float(m[5]) <= 1 for m in lines)
    assert lines[-1][9] == "0:00:00"  # nothing left after the last epoch
    quiet = subprocess.run(
        [str(BIN / "mipseg_train"), "-d", name, "-f", "1", "--quiet", *QUICK],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    assert "epoch" not in quiet.stdout + quiet.stderr


# --- kill tests: SIGINT and SIGKILL at seeded points, then --continue ------------------------------


def _interruptible() -> None:
    """SIGINT back to its default in the child: a suite started in the background (``make test &``)
    runs with SIGINT ignored, Python then keeps ignoring it, and Ctrl-C could not be simulated."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_until(command: list[str], ready, sig: int, timeout: float = 120.0) -> int:
    """Start ``command``, send ``sig`` as soon as ``ready()`` holds (polled every 20 ms); its exit code.

    The point is "random" but reproducible: the first moment a given file appears.
    """
    process = subprocess.Popen(
        command,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_interruptible,
    )
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is None:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode != 0, f"{command[0]} finished before it was killed; stderr: {stderr[-500:]}"
    if process.returncode not in (130, -signal.SIGKILL):
        raise AssertionError(stderr.decode()[-3000:])
    return process.returncode


def _no_partials(folder: Path) -> bool:
    return not any(".partial-" in p.name for p in folder.rglob("*"))


SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])


@SIGNALS
def test_train_killed_keeps_the_finished_model_and_continue_completes(trained, sig) -> None:
    name, fold_dir = trained
    final = fold_dir / "checkpoint_final.pt"
    before = final.read_bytes()
    latest = fold_dir / "checkpoint_latest.pt"
    command = [str(BIN / "mipseg_train"), "-d", name, "-f", "0", "--quiet", *QUICK, "--save-every", "1"]
    command[command.index("--epochs") + 1] = "30"
    code = _run_until(command, latest.is_file, sig)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), code
    assert final.read_bytes() == before  # the finished model is untouched and still loads
    assert ckpt.load_checkpoint(final)["epoch"] == 1
    resumed = ckpt.load_checkpoint(latest)
    assert 1 <= resumed["epoch"] < 30 and resumed["config"]["epochs"] == 30
    subprocess.run([*command, "--continue", "--epochs", "3"], env=_env(), check=True, capture_output=True)
    done = ckpt.load_checkpoint(final)
    assert done["config"]["epochs"] == 3 and done["epoch"] >= resumed["epoch"]
    assert not latest.exists() and _no_partials(fold_dir)


@SIGNALS
def test_predict_killed_keeps_finished_cases_and_continue_completes(trained, data_roots, sig) -> None:
    name, _ = trained
    images, output = data_roots["raw"] / name / "imagesTr", data_roots["raw"] / "predicted"
    command = [str(BIN / "mipseg_predict"), "-i", str(images), "-o", str(output), "-d", name]
    command += ["-f", "0", "--disable-tta", "--device", "cpu", "--disable-progress-bar"]
    subprocess.run(command, env=_env(), check=True, capture_output=True)
    before = _snapshot(output)
    # a second run over the same folder, killed once it has rewritten its run files
    args = output / "predict_args.json"
    stamp = args.stat().st_mtime_ns
    _run_until(command, lambda: args.stat().st_mtime_ns != stamp, sig)
    for case in ("case_000", "case_001", "case_002"):  # each case is the old or the new file, whole
        label, _ = io.read_image(output / f"{case}.nii.gz")
        assert label.shape == (16, 40, 40)
    subprocess.run([*command, "--continue"], env=_env(), check=True, capture_output=True)
    after = _snapshot(output)
    assert {k for k in after if k.endswith(".nii.gz")} == {k for k in before if k.endswith(".nii.gz")}
    assert _no_partials(output)


@pytest.fixture
def organs(data_roots) -> str:
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(
        991,
        "organs",
        num_cases=3,
        num_test_cases=0,
        shape=(16, 32, 32),
        spacing=(3.0, 1.0, 1.0),
        show_progress=False,
    )
    return "991"


@SIGNALS
def test_plan_killed_keeps_finished_cases_and_continue_completes(organs, data_roots, sig) -> None:
    command = [str(BIN / "mipseg_plan"), "-d", organs, "-np", "1", "--device", "cpu"]
    folder = data_roots["preprocessed"]
    _run_until(command, lambda: any(folder.rglob("data/*.npy")), sig)
    # pathlib's "*" also matches the hidden temporary file a killed writer leaves; only the final
    # names promise a whole array (the temporary is cleared by --continue, tested below)
    for array in folder.rglob("data/*.npy"):
        if ".partial-" not in array.name:
            assert np.load(array).ndim == 4  # what exists under its final name is complete
    subprocess.run([*command, "--continue"], env=_env(), check=True, capture_output=True)
    data = next(folder.glob("Dataset991_*")) / "data"
    assert len(list(data.glob("*.npy"))) == 3 and _no_partials(folder)
    assert not list((data.parent / "mips").glob("*.png"))  # organs drawn on a slice: no MIPs


def test_plan_continue_removes_what_a_killed_writer_left(organs, data_roots) -> None:
    # SIGKILL between a case's array and its properties leaves a temporary file (the timing-dependent
    # kill above hits this only sometimes, so here the leftovers are made on purpose)
    command = [str(BIN / "mipseg_plan"), "-d", organs, "-np", "1", "--device", "cpu"]
    subprocess.run(command, env=_env(), check=True, capture_output=True)
    dataset = next(data_roots["preprocessed"].glob("Dataset991_*"))
    (dataset / "data" / "organs_001.json").unlink()  # that case counts as unfinished
    planted = [
        dataset / "data" / ".organs_001.partial-0000dead.json",
        dataset / "data" / ".organs_001.partial-0000beef.npy",  # the empty array file CI once met
        dataset / "data" / "labelsets" / "dense" / ".organs_001_locations.partial-0000dead.npz",
        dataset / ".plans.partial-0000dead.json",
    ]
    for path in planted:
        path.write_bytes(b"" if path.suffix == ".npy" else b"half")
    subprocess.run([*command, "--continue"], env=_env(), check=True, capture_output=True)
    assert (dataset / "data" / "organs_001.json").is_file() and _no_partials(dataset)


PROPAGATE = ["--iters", "3", "--refine-iters", "10", "--coarse-iters", "5", "--device", "cpu"]


@SIGNALS
def test_propagate_killed_over_a_finished_label_set_keeps_it(organs, data_roots, sig) -> None:
    command = [str(BIN / "mipseg_propagate"), "-d", organs, "--name", "organs", *PROPAGATE]
    subprocess.run([*command, "--method", "copy"], env=_env(), check=True, capture_output=True)
    labelset = next(data_roots["preprocessed"].glob("Dataset991_*")) / "labelsets" / "organs"
    before = _snapshot(labelset)
    staged = labelset.with_name(".organs.next")
    _run_until([*command, "--method", "flow"], (staged / "labelset.json").is_file, sig)
    assert _snapshot(labelset) == before  # training still reads the finished (copy) set
    subprocess.run([*command, "--method", "flow", "--continue"], env=_env(), check=True, capture_output=True)
    assert io.read_json(labelset / "report.json")["method"] == "flow"
    assert len(io.read_json(labelset / "report.json")["cases"]) == 3
    assert not staged.exists() and not labelset.with_name(".organs.old").exists()


def test_propagate_continue_removes_what_a_killed_writer_left(organs, data_roots) -> None:
    command = [str(BIN / "mipseg_propagate"), "-d", organs, "--name", "organs", "--method", "copy"]
    subprocess.run([*command, *PROPAGATE], env=_env(), check=True, capture_output=True)
    labelset = next(data_roots["preprocessed"].glob("Dataset991_*")) / "labelsets" / "organs"
    (labelset / "organs_001.nii.gz").unlink()  # the case a kill interrupted while writing it
    planted = [labelset / ".organs_001.partial-0000dead.nii.gz", labelset / ".report.partial-0000dead.json"]
    for path in planted:
        path.write_bytes(b"half")
    subprocess.run([*command, *PROPAGATE, "--continue"], env=_env(), check=True, capture_output=True)
    assert (labelset / "organs_001.nii.gz").is_file() and _no_partials(labelset)


@SIGNALS
def test_refine_interrupted_over_a_finished_label_set_keeps_it(data_roots, sig) -> None:
    from test_refine import _train_two_folds

    name = _train_two_folds(data_roots)
    command = [str(BIN / "mipseg_refine"), "-d", name, "--device", "cpu", "--passes", "1"]
    subprocess.run(command, env=_env(), check=True, capture_output=True)
    labelset = data_roots["preprocessed"] / name / "labelsets" / "refined"
    before = _snapshot(labelset)
    staged = labelset.with_name(".refined.next")
    _run_until([*command, "--passes", "3"], (staged / "labelset.json").is_file, sig)
    assert _snapshot(labelset) == before
    subprocess.run([*command, "--passes", "3", "--continue"], env=_env(), check=True, capture_output=True)
    description = io.read_json(labelset / "labelset.json")
    assert (
        description["settings"]["passes"] == 3 and len(io.read_json(labelset / "report.json")["cases"]) == 4
    )
    assert not staged.exists()


@pytest.mark.parametrize("fold", [0, "all"])
def test_train_after_a_kill_in_label_preprocessing_completes_the_label_set(trained, data_roots, fold) -> None:
    # a kill while mipseg_train preprocesses a label set leaves some cases without their copy and a
    # hidden temporary of the one being written; the next run must finish the set, not miss the case
    # or take the temporary for a case
    name, _ = trained
    copies = LabelSet(name, "pseudo")  # the set train_fold trains on
    missing = copies.preprocessed_file("case_001")
    missing.unlink()
    copies.preprocessed_file("case_001", "locations").unlink(missing_ok=True)
    leftover = copies.preprocessed_folder / ".case_001.partial-0000dead.npy"
    leftover.write_bytes(b"")
    fold_dir = train_fold(name, fold, config=_config(), show_progress=False)
    assert (fold_dir / "checkpoint_final.pt").is_file()
    assert missing.is_file() and not leftover.exists()


def test_propagate_continue_goes_on_over_a_set_an_older_version_began(organs, data_roots) -> None:
    # label sets made before --no-verify-between existed have no "verify_between" in their
    # settings; they were verified everywhere, which is what the key's default does. Older ones
    # have no "fusion" (they took the nearer drawing) and no "band_growth" (0) either.
    command = [
        str(BIN / "mipseg_propagate"),
        "-d",
        organs,
        "--name",
        "organs",
        "--method",
        "copy",
        *PROPAGATE,
    ]
    subprocess.run(command, env=_env(), check=True, capture_output=True)
    description = next(data_roots["preprocessed"].glob("Dataset991_*")) / "labelsets/organs/labelset.json"
    older = io.read_json(description)
    del older["settings"]["verify_between"]
    io.write_json(older, description)
    subprocess.run([*command, "--continue"], env=_env(), check=True, capture_output=True)
    assert io.read_json(description)["settings"]["verify_between"] is True
    oldest = {
        **older,
        "settings": {k: v for k, v in older["settings"].items() if k not in ("fusion", "band_growth")},
    }
    io.write_json(oldest, description)
    refused = subprocess.run([*command, "--continue"], env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "other settings" in refused.stderr, refused.stderr  # two-sided now
    subprocess.run(
        [*command, "--continue", "--fusion", "nearer"], env=_env(), check=True, capture_output=True
    )
    settings = io.read_json(description)["settings"]
    assert (settings["fusion"], settings["band_growth"], settings["verify_between"]) == ("nearer", 0.0, True)
    io.write_json(older, description)
    refused = subprocess.run(
        [*command, "--continue", "--no-verify-between"], env=_env(), capture_output=True, text=True
    )
    assert refused.returncode == 2 and "other settings" in refused.stderr, refused.stderr
