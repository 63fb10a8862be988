"""Sliding-window prediction speed (voxels/s) of mipseg, with and without mirroring TTA, vs nnU-Net.

Times the prediction of one preprocessed volume (``--shape``, default 64x96x96) with a
random-weight network of the plans' topology and patch (``--plans plans.json``, or a default
4-stage 3D U-Net with patch 48x64x64), one fold, step 0.5, Gaussian weighting. When nnunetv2 is
importable, nnU-Net's ``nnUNetPredictor.predict_sliding_window_return_logits`` runs the same
volume with dynamic-network-architectures' ``PlainConvUNet`` of the same size (random weights; only
speed is compared). Best of ``--repeats`` interleaved runs after one warm-up tile; file I/O and
preprocessing excluded. The CPU time of the process (all threads) is printed too: on a shared
machine it varies less than the wall time.

Usage::

    .venv/bin/python benchmarks/predict_speed.py [--shape 64 96 96] [--plans PATH] [--threads 2]
        [--repeats 2] [--batch-size 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 96, 96), help="(z, y, x) of the volume")
    parser.add_argument("--plans", default=None, help="plans.json whose topology and patch to use")
    parser.add_argument("--patch", type=int, nargs=3, default=(48, 64, 64), help="patch without --plans")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128], help="without --plans")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (mipseg)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-tta", action="store_true", help="time only the run without mirroring")
    args = parser.parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # before numpy and torch are imported

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    plans = load_or_make_plans(args)
    data = np.random.default_rng(0).normal(size=(plans.num_channels, *args.shape)).astype(np.float32)
    voxels = int(np.prod(args.shape))
    print(
        f"volume {tuple(args.shape)}, patch {tuple(plans.patch_size)}, features "
        f"{plans.network.features_per_stage}, threads {args.threads}, device {args.device}"
    )
    for tta in (False,) if args.skip_tta else (False, True):
        runners = {"mipseg": mipseg_runner(plans, data, args, tta)}
        try:
            runners["nnU-Net"] = nnunet_runner(plans, data, args, tta)
        except ImportError as error:
            print(f"nnU-Net tta={tta!s:5}: skipped (nnunetv2 not importable: {error})")
        # interleaved repeats, best of each: load drift on a shared machine hits both alike
        wall = {name: [] for name in runners}
        cpu = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        for name, seconds in wall.items():
            runs = ", ".join(f"{t:.2f}" for t in seconds)
            print(
                f"{name:7} tta={tta!s:5}: {voxels / min(seconds):12,.0f} voxels/s (best of {runs} s); "
                f"CPU time {min(cpu[name]):.2f} s"
            )


def load_or_make_plans(args: argparse.Namespace):
    """Plans from ``--plans`` or a plain U-Net of ``--features`` with strides 2 after stage 0."""
    from mipseg.planning.plans import NetworkTopology, Plans, load_plans

    if args.plans:
        return load_plans(args.plans)
    n = len(args.features)
    labels = {"background": 0, **{f"class{i}": i for i in range(1, args.classes)}}
    return Plans(
        dataset_name="Dataset999_Benchmark",
        spacing=[1.0, 1.0, 1.0],
        original_median_spacing=[1.0, 1.0, 1.0],
        median_shape=list(args.shape),
        patch_size=list(args.patch),
        batch_size=2,
        network=NetworkTopology(
            features_per_stage=list(args.features),
            kernel_sizes=[[3, 3, 3]] * n,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        ),
        normalization=["ZScore"],
        use_mask_for_norm=[False],
        intensity_properties={},
        resampling={},
        labels=labels,
        ignore_label=args.classes,
    )


def mipseg_runner(plans, data, args: argparse.Namespace, tta: bool):
    """A function predicting ``data`` with mipseg's sliding window (network warmed up)."""
    import torch

    from mipseg.inference.predictor import Predictor
    from mipseg.training.network import build_network

    torch.manual_seed(0)
    network = build_network(
        plans, num_input_channels=plans.num_channels, num_classes=plans.num_classes, deep_supervision=False
    )
    predictor = Predictor(
        [network],
        plans,
        {},
        mirror_axes=(0, 1, 2) if tta else (),
        batch_size=args.batch_size,
        device=args.device,
    )
    with torch.inference_mode():  # warm-up: one tile
        predictor.networks[0](torch.zeros(1, plans.num_channels, *plans.patch_size, device=predictor.device))
    return lambda: predictor.predict_preprocessed(data)


def nnunet_runner(plans, data, args: argparse.Namespace, tta: bool):
    """nnU-Net's own sliding window on the same volume (raises ImportError without nnunetv2)."""
    from types import SimpleNamespace

    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    topology = plans.network
    torch.manual_seed(0)
    network = PlainConvUNet(
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
        deep_supervision=False,
    )
    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        allow_tqdm=False,
    )
    # only what predict_sliding_window_return_logits reads; no plans/dataset files are needed for speed
    predictor.network = network
    predictor.configuration_manager = SimpleNamespace(patch_size=list(plans.patch_size))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=plans.num_classes)
    predictor.allowed_mirroring_axes = (0, 1, 2)
    tensor = torch.from_numpy(data)
    with torch.inference_mode():
        network.to(device).eval()(torch.zeros(1, plans.num_channels, *plans.patch_size, device=device))
    return lambda: predictor.predict_sliding_window_return_logits(tensor)


if __name__ == "__main__":
    main()
