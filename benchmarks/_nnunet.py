"""What the full-size benchmarks share for nnU-Net: its roots, its network, a model folder of mipseg's size.

nnunetv2 is not a project dependency; import this module only where nnU-Net columns are wanted and
catch ``ImportError`` around the functions that need it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

NNUNET_MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def set_nnunet_roots(work: Path) -> None:
    """nnU-Net's three root folders under ``work``, in the environment (before nnunetv2 is imported)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(work / name)
        (work / name).mkdir(parents=True, exist_ok=True)


def nnunet_network(plans, deep_supervision: bool):
    """nnU-Net's ``PlainConvUNet`` with the topology of mipseg's ``plans`` (random weights)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    topology = plans.network
    return PlainConvUNet(
        input_channels=plans.num_channels,
        n_stages=topology.num_stages,
        features_per_stage=topology.features_per_stage,
        conv_op=torch.nn.Conv3d,
        kernel_sizes=topology.kernel_sizes,
        strides=topology.strides,
        n_conv_per_stage=topology.n_conv_per_stage,
        num_classes=plans.num_classes,
        n_conv_per_stage_decoder=[topology.n_conv_per_stage_decoder] * (topology.num_stages - 1),
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )


def nnunet_model_folder(
    dataset_name: str, mipseg_raw_dataset: Path, plans, num_processes: int, log=print
) -> Path:
    """nnU-Net model folder with mipseg's topology and patch (random weights); nnU-Net's planner writes it.

    The raw dataset is copied into ``nnUNet_raw`` (without test images and annotations), nnU-Net
    extracts its fingerprint and plans, and its ``3d_fullres`` patch, spacing and architecture are
    then set to mipseg's (nnU-Net's lists are in its transposed axis order). Only speed is compared:
    the weights are random. Needs :func:`set_nnunet_roots` first.

    Raises
    ------
    ImportError
        nnunetv2 is not installed.
    """
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    dataset_id = int(dataset_name[len("Dataset") : len("Dataset") + 3])
    nn_raw = Path(os.environ["nnUNet_raw"]) / dataset_name
    if not nn_raw.is_dir():
        shutil.copytree(
            mipseg_raw_dataset, nn_raw, ignore=shutil.ignore_patterns("imagesTs", "labelsTs", "annotationsTr")
        )
    start = time.time()
    extract_fingerprints(
        [dataset_id], num_processes=num_processes, check_dataset_integrity=False, verbose=False
    )
    plan_experiments([dataset_id])
    nn_plans_path = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "nnUNetPlans.json"
    nn_plans = json.loads(nn_plans_path.read_text())
    config = nn_plans["configurations"]["3d_fullres"]
    topology = plans.network
    log(
        f"  nnU-Net's own 3d_fullres plan: patch {config['patch_size']}, spacing {config['spacing']}, "
        f"features {config['architecture']['arch_kwargs']['features_per_stage']} "
        f"({time.time() - start:.0f} s)"
    )
    forward = nn_plans["transpose_forward"]
    # mipseg's lists are (z, y, x) of the image; nnU-Net's are in its transposed axis order
    config["patch_size"] = [plans.patch_size[a] for a in forward]
    config["spacing"] = [plans.spacing[a] for a in forward]
    config["architecture"]["arch_kwargs"].update(
        n_stages=topology.num_stages,
        features_per_stage=list(topology.features_per_stage),
        kernel_sizes=[[k[a] for a in forward] for k in topology.kernel_sizes],
        strides=[[s[a] for a in forward] for s in topology.strides],
        n_conv_per_stage=[topology.n_conv_per_stage] * topology.num_stages,
        n_conv_per_stage_decoder=[topology.n_conv_per_stage_decoder] * (topology.num_stages - 1),
    )
    model_dir = Path(os.environ["nnUNet_results"]) / dataset_name / NNUNET_MODEL
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(nn_plans, indent=1))
    dataset_json = json.loads((nn_raw / "dataset.json").read_text())
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    torch.manual_seed(0)
    network = nnunet_network(plans, deep_supervision=False)
    torch.save(
        {
            "network_weights": network.state_dict(),
            "init_args": {"configuration": "3d_fullres", "fold": 0},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        model_dir / "fold_0" / "checkpoint_final.pth",
    )
    return model_dir
