"""Nothing finished is lost: bad input, a fresh run, Ctrl-C or a kill never destroy a finished model,
label set or prediction, and ``--continue`` completes the rest. Also: training's per-epoch line."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_helpers import tiny_plans, write_tiny_dataset

from mipseg.errors import InputError
from mipseg.inference.predict_api import PredictionSettings, predict_folder
from mipseg.training import checkpoint as ckpt
from mipseg.training import train_api
from mipseg.training.loop import TrainingConfig
from mipseg.training.train_api import train_fold

torch.set_num_threads(1)
BIN = Path(sys.executable).parent
RESAMPLING = {
    "data_order": 3,
    "data_order_z": 0,
    "seg_order": 1,
    "seg_order_z": 0,
    "probabilities_order": 1,
    "probabilities_order_z": 0,
    "separate_z_anisotropy_threshold": 3.0,
}
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
    plans.resampling = dict(RESAMPLING)  # prediction resamples (the identity here)
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
