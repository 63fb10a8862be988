"""The plans-built 3D U-Net: output shapes, deep supervision, features, dropout, init."""

from __future__ import annotations

import torch
from _training_helpers import tiny_plans

from mipseg.training.network import build_network, conv_feature_map_size, deep_supervision_scales


def test_deep_supervision_outputs_highest_resolution_first() -> None:
    plans = tiny_plans()
    net = build_network(plans, num_input_channels=1, num_classes=3)
    outputs = net(torch.randn(2, 1, 16, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 32, 32), (2, 3, 8, 16, 16)]
    scales = deep_supervision_scales(plans.network)
    assert scales == [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]


def test_plain_output_and_features_for_the_mip_branch() -> None:
    plans = tiny_plans(features=(4, 8, 16, 16))
    net = build_network(plans, num_input_channels=2, num_classes=2, deep_supervision=False)
    logits, features = net(torch.randn(1, 2, 16, 32, 32), return_features=True)
    assert logits.shape == (1, 2, 16, 32, 32)
    assert [tuple(f.shape[1:]) for f in features.encoder] == [
        (4, 16, 32, 32),
        (8, 8, 16, 16),
        (16, 4, 8, 8),
        (16, 2, 4, 4),
    ]
    assert [tuple(f.shape[1:]) for f in features.decoder] == [(4, 16, 32, 32), (8, 8, 16, 16), (16, 4, 8, 8)]


def test_anisotropic_kernels_and_strides() -> None:
    plans = tiny_plans()
    plans.network.kernel_sizes = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    plans.network.strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    net = build_network(plans, num_input_channels=1, num_classes=2)
    outputs = net(torch.randn(1, 1, 8, 32, 32))
    assert [tuple(o.shape[2:]) for o in outputs] == [(8, 32, 32), (8, 16, 16)]


def test_dropout_is_stochastic_in_train_mode_only() -> None:
    torch.manual_seed(0)
    net = build_network(
        tiny_plans(), num_input_channels=1, num_classes=2, deep_supervision=False, dropout=0.5
    )
    x = torch.randn(1, 1, 16, 32, 32)
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    assert torch.allclose(net(x), net(x))
    # without dropout train-mode passes agree (instance norm has no running statistics)
    plain = build_network(tiny_plans(), num_input_channels=1, num_classes=2, deep_supervision=False)
    plain.train()
    assert torch.allclose(plain(x), plain(x))


def test_checkpoints_interchange_between_deep_supervision_and_plain() -> None:
    plans = tiny_plans()
    trained = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=True)
    inference = build_network(plans, num_input_channels=1, num_classes=2, deep_supervision=False)
    inference.load_state_dict(trained.state_dict())
    x = torch.randn(1, 1, 16, 32, 32)
    trained.eval(), inference.eval()
    assert torch.allclose(trained(x)[0], inference(x))


def test_he_init_and_feature_map_size_grows_with_patch() -> None:
    plans = tiny_plans()
    net = build_network(plans, num_input_channels=1, num_classes=2)
    first_conv = net.encoder[0][0][0]
    fan_in = first_conv.weight[0].numel()
    assert abs(first_conv.weight.std().item() - (2 / fan_in) ** 0.5) < 0.5 * (2 / fan_in) ** 0.5
    assert torch.count_nonzero(first_conv.bias) == 0
    small = conv_feature_map_size(plans.network, (16, 32, 32), 1, 2)
    large = conv_feature_map_size(plans.network, (32, 64, 64), 1, 2)
    assert large == 8 * small
