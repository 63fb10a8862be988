"""mipseg_train end to end on a tiny preprocessed dataset (CPU, a few iterations)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import tiny_plans, write_tiny_dataset
from typer.testing import CliRunner

from mipseg.cli.train import app
from mipseg.errors import InputError
from mipseg.training import checkpoint as ckpt
from mipseg.training import fold_inputs, train_api
from mipseg.training.loop import TrainingConfig
from mipseg.training.network import build_network
from mipseg.training.train_api import train_fold

torch.set_num_threads(1)


def _config(**overrides) -> TrainingConfig:
    values = dict(epochs=2, iters_per_epoch=2, val_iters=1, num_workers=0, device="cpu", save_every=1)
    values.update(overrides)
    return TrainingConfig(**values)


def test_training_writes_checkpoints_log_and_out_of_fold_probabilities(data_roots) -> None:
    name = write_tiny_dataset(data_roots, seeds=True)
    fold_dir = train_fold(name, 0, config=_config(), show_progress=False)
    assert fold_dir == data_roots["results"] / name / "plain__pseudo__3d_fullres" / "fold_0"
    assert (fold_dir.parent / "plans.json").is_file() and (fold_dir.parent / "dataset.json").is_file()
    assert {p.name for p in fold_dir.glob("checkpoint_*.pt")} == {"checkpoint_best.pt", "checkpoint_final.pt"}
    assert (fold_dir / "progress.png").stat().st_size > 0
    log = (fold_dir / "training_log.txt").read_text()
    assert "epoch 1/2 train_loss" in log and "epoch 2/2 train_loss" in log and "pseudo_dice" in log
    final = ckpt.load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert final["epoch"] == 2 and final["trainer"] == "plain" and final["labelset"] == "pseudo"
    assert len(final["logging"]["train_loss"]) == 2
    # seeds were found and preprocessed, and their term was logged
    assert (data_roots["preprocessed"] / name / "data/labelsets/pseudo/case_000_seeds.npy").is_file()
    # out-of-fold probabilities exist for exactly the validation cases
    validation = fold_dir / "validation"
    assert sorted(p.name for p in validation.glob("*.npz")) == ["case_003.npz"]
    with np.load(validation / "case_003.npz") as stored:
        probabilities = stored["probabilities"]
        assert "bbox" in str(stored["properties"])
    assert probabilities.dtype == np.float16 and probabilities.shape == (2, 16, 40, 40)
    assert np.allclose(probabilities.astype(np.float32).sum(0), 1, atol=1e-2)
    summary = ckpt.io.read_json(validation / "summary.json")
    assert "labelset_dice" in summary["cases"]["case_003"] and "dense_dice" in summary["cases"]["case_003"]
    # the checkpoint rebuilds the network for prediction
    network = ckpt.network_from_checkpoint(final)
    assert network(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 2, 16, 32, 32)


def test_same_seed_gives_the_same_weights(data_roots) -> None:
    name = write_tiny_dataset(data_roots, num_cases=3)
    weights = []
    for labels in ("pseudo", "pseudo"):
        fold_dir = train_fold(
            name, "all", labels=labels, config=_config(epochs=1, val_iters=0), show_progress=False
        )
        weights.append(ckpt.load_checkpoint(fold_dir / "checkpoint_final.pt")["network_weights"])
        shutil.rmtree(fold_dir)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_interrupted_run_resumes_at_the_same_epoch_with_the_same_optimizer_state(
    data_roots, monkeypatch
) -> None:
    name = write_tiny_dataset(data_roots)
    real_run_epoch = train_api.run_epoch
    calls = []

    def interrupted_second_epoch(state, *args, **kwargs):
        calls.append(state.epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_epoch(state, *args, **kwargs)

    monkeypatch.setattr(train_api, "run_epoch", interrupted_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_fold(name, 0, config=_config(epochs=3, save_every=10), show_progress=False)
    fold_dir = data_roots["results"] / name / "plain__pseudo__3d_fullres" / "fold_0"
    latest = ckpt.load_checkpoint(fold_dir / "checkpoint_latest.pt")
    assert latest["epoch"] == 1 and not (fold_dir / "checkpoint_final.pt").exists()

    monkeypatch.setattr(train_api, "run_epoch", real_run_epoch)
    restored = {}
    real_restore = train_api.restore_state

    def capture(state, checkpoint):
        real_restore(state, checkpoint)
        restored["epoch"] = state.epoch
        restored["optimizer"] = copy.deepcopy(state.optimizer.state_dict())  # live buffers change later

    monkeypatch.setattr(train_api, "restore_state", capture)
    train_fold(name, 0, config=_config(epochs=None), resume=True, show_progress=False)
    assert restored["epoch"] == 1
    saved = latest["optimizer_state"]["state"]
    assert saved and all(
        torch.equal(saved[k]["momentum_buffer"], restored["optimizer"]["state"][k]["momentum_buffer"])
        for k in saved
    )
    final = ckpt.load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert final["epoch"] == 3 and len(final["logging"]["train_loss"]) == 3
    assert "resumed at epoch 1" in (fold_dir / "training_log.txt").read_text()
    assert not (fold_dir / "checkpoint_latest.pt").exists()


def test_a_checkpoint_is_never_half_written(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint_latest.pt"
    good = {"network_weights": {}, "epoch": 4, "trainer": "plain", "labelset": "x", "plans": {}}
    good.update(dataset_json={}, dropout=0.0)
    ckpt.save_checkpoint(good, path)
    real_save = torch.save

    def interrupted_save(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({**good, "epoch": 5}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint(path)["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]
    path.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(path)


def test_init_from_copies_weights_and_replaces_heads_of_another_class_count(tmp_path: Path) -> None:
    plans = tiny_plans()
    three_classes = build_network(plans, num_input_channels=1, num_classes=3)
    source = {"network_weights": three_classes.state_dict(), "epoch": 1, "trainer": "plain", "labelset": "x"}
    source.update(plans=plans.to_json(), dataset_json={}, dropout=0.0)
    ckpt.save_checkpoint(source, tmp_path / "c.pt")
    target = build_network(plans, num_input_channels=1, num_classes=2)
    skipped = fold_inputs.load_init_weights(target, tmp_path / "c.pt")
    assert skipped and all(k.startswith("seg_heads.") for k in skipped)
    assert torch.equal(target.encoder[0][0][0].weight, three_classes.encoder[0][0][0].weight)
    other = build_network(tiny_plans(features=(4, 8, 32)), num_input_channels=1, num_classes=2)
    with pytest.raises(InputError, match="has shape"):
        fold_inputs.load_init_weights(other, tmp_path / "c.pt")


def test_cli_reports_bad_input_in_one_line(data_roots) -> None:
    name = write_tiny_dataset(data_roots, num_cases=2)
    runner = CliRunner()
    result = runner.invoke(app, ["-d", name, "-f", "7", "--device", "cpu"])
    assert result.exit_code == 2 and "fold must be 0..4 or 'all'" in result.output
    result = runner.invoke(app, ["-d", name, "-f", "0", "--labels", "scribbles", "--device", "cpu"])
    assert result.exit_code == 2 and "label set 'scribbles' not found" in result.output
    result = runner.invoke(app, ["-d", name, "-f", "0", "--dropout", "1.5", "--device", "cpu"])
    assert result.exit_code == 2 and "--dropout must be in [0, 1)" in result.output
    result = runner.invoke(app, ["-d", name, "-f", "0", "--skeleton-weight", "-1", "--device", "cpu"])
    assert result.exit_code == 2 and "--skeleton-weight must be >= 0, got -1.0" in result.output
    result = runner.invoke(app, ["-d", name, "-f", "0", "--undrawn-classes", "maybe", "--device", "cpu"])
    assert result.exit_code == 2 and "--undrawn-classes must be one of marginal, background" in result.output


def test_the_label_sets_undrawn_classes_reach_the_training_cases(data_roots) -> None:
    """A propagated set's report lists classes a case's drawings left out; each training case carries them."""
    name = write_tiny_dataset(data_roots, num_cases=3)
    report = {"cases": {"case_000": {"undrawn_classes": [1]}, "case_001": {"undrawn_classes": []}}}
    ckpt.io.write_json(report, data_roots["preprocessed"] / name / "labelsets" / "pseudo" / "report.json")
    inputs = fold_inputs.resolve_inputs(name, "all", "pseudo")
    assert {case.case_id: case.undrawn for case in inputs.train_cases} == {
        "case_000": (1,),
        "case_001": (),
        "case_002": (),
    }
    assert all(case.undrawn == () for case in fold_inputs.resolve_inputs(name, "all", "dense").train_cases)


def test_ddp_with_two_gloo_processes_runs_one_epoch(data_roots) -> None:
    name = write_tiny_dataset(data_roots)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2",
        str(Path(sys.executable).parent / "mipseg_train"),
        "-d", name, "-f", "0", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
        "--num-workers", "0", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    fold_dir = data_roots["results"] / name / "plain__pseudo__3d_fullres" / "fold_0"
    final = ckpt.load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert final["epoch"] == 1
    log = (fold_dir / "training_log.txt").read_text()
    assert log.count("epoch 1/1 ") == 1  # only rank 0 writes
    assert (fold_dir / "validation" / "case_003.npz").is_file()
