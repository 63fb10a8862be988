"""Single-slice mask propagation: warping conventions, losses, training/resume, stop rule,
propagation quality on synthetic organs, deterministic suggestions, the command end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from mipseg import io, paths
from mipseg.errors import InputError
from mipseg.metrics import dice
from mipseg.propagation import train_flow
from mipseg.propagation.baselines import copy_transport, demons_flow, registration_transport
from mipseg.propagation.flow_net import FlowNet, FlowNetConfig, normalize_volume
from mipseg.propagation.instance_optimization import (
    InstanceOptimization,
    for_slice_spacing,
    neighbour_loss,
    optimize_flows,
    refinement_size,
)
from mipseg.propagation.losses import (
    box_mean,
    chain_loss,
    curriculum_span,
    inter_slice_smoothness,
    local_ncc_loss,
    neighbour_reconstruction_loss,
)
from mipseg.propagation.propagate import flow_transport, propagate_slices
from mipseg.propagation.slice_selection import (
    candidate_slices,
    extent_coverage_cost,
    spread_over_extent,
    spread_slices,
    suggest_slice,
    suggest_spread_slices,
)
from mipseg.propagation.warping import resize_flow, symmetric_flows, warp_slice

torch.set_num_threads(1)
TINY_NET = FlowNetConfig(features=(4, 8, 8), working_size=(32, 32))


def translating_organ(depth: int = 24, size: int = 48, shift=(0.75, -0.5), seed: int = 0):
    """A textured organ phantom that moves by ``shift`` pixels per slice and is an ellipsoid along z.

    A neighbour of about the same brightness touches the organ. Returns the image ``(D, H, W)``,
    the organ label ``(D, H, W)`` and the exact forward/backward flows ``(D, 2, H, W)``.
    """
    rng = np.random.default_rng(seed)
    extent = 4 * size
    texture = ndimage.gaussian_filter(rng.normal(size=(extent, extent)), 2.0)
    texture /= np.abs(texture).max()
    centre = np.array([extent / 2, extent / 2])
    rows, cols = np.mgrid[:size, :size].astype(float)
    image = np.zeros((depth, size, size), np.float32)
    label = np.zeros((depth, size, size), np.uint8)
    z_centre, z_half = depth / 2, max(depth / 2 - 4, 0.4 * depth)
    for z in range(depth):
        offset = centre - size / 2 - np.asarray(shift) * z  # content moves by +shift per slice
        y, x = rows + offset[0], cols + offset[1]
        scale = max(0.0, 1 - ((z - z_centre) / z_half) ** 2) ** 0.5
        organ = ((y - centre[0]) / 11) ** 2 + ((x - centre[1]) / 8) ** 2 < scale**2
        neighbour = ((y - centre[0]) / 7) ** 2 + ((x - centre[1] - 14) / 6) ** 2 <= 1
        tex = texture[np.clip(y.astype(int), 0, extent - 1), np.clip(x.astype(int), 0, extent - 1)]
        image[z] = 0.3 + 0.05 * tex
        image[z][neighbour & ~organ] = 0.75 + 0.05 * tex[neighbour & ~organ]
        image[z][organ] = 0.8 + 0.05 * tex[organ]
        label[z] = organ
    forward = np.zeros((depth, 2, size, size), np.float32)
    forward[:, 0], forward[:, 1] = -shift[0], -shift[1]
    return image, label, torch.from_numpy(forward), torch.from_numpy(-forward)


# --- warping conventions -----------------------------------------------------------------------


def test_zero_flow_is_identity_and_constant_flow_is_a_shift():
    image = torch.rand(2, 3, 9, 11)
    assert torch.allclose(warp_slice(image, torch.zeros(2, 2, 9, 11)), image, atol=1e-6)
    flow = torch.zeros(2, 2, 9, 11)
    flow[:, 0], flow[:, 1] = 2.0, -3.0  # output (y, x) samples source (y + 2, x - 3)
    warped = warp_slice(image, flow, padding_mode="zeros")
    assert torch.allclose(warped[:, :, :-2, 3:], image[:, :, 2:, :-3], atol=1e-5)
    assert torch.all(warped[:, :, -2:, :] == 0) and torch.all(warped[:, :, :, :3] == 0)
    half = torch.zeros(1, 2, 9, 11)
    half[:, 1] = 0.5
    row = torch.arange(11.0).expand(1, 1, 9, 11)
    assert torch.allclose(warp_slice(row, half)[..., :-1], row[..., :-1] + 0.5, atol=1e-5)


def test_resized_flow_moves_the_same_physical_distance():
    flow = torch.zeros(1, 2, 5, 9)
    flow[:, 0], flow[:, 1] = 1.0, 2.0
    big = resize_flow(flow, (9, 17))
    assert torch.allclose(big[:, 0], torch.full((1, 9, 17), 2.0)) and torch.allclose(
        big[:, 1], torch.full((1, 9, 17), 4.0)
    )


def test_symmetric_flows_keep_consistent_pairs_and_average_inconsistent_ones():
    shift = torch.zeros(4, 2, 12, 12)
    shift[:, 0], shift[:, 1] = 1.5, -0.5
    forward, backward = symmetric_flows(shift, -shift)  # already inverse to each other
    assert torch.allclose(forward, shift, atol=1e-5) and torch.allclose(backward, -shift, atol=1e-5)
    forward, backward = symmetric_flows(shift, torch.zeros_like(shift))  # the two ends disagree
    assert torch.allclose(forward[:-1], 0.5 * shift[:-1], atol=1e-5)
    assert torch.allclose(backward[1:], -0.5 * shift[1:], atol=1e-5)
    assert torch.equal(forward[-1], shift[-1]) and torch.equal(backward[0], torch.zeros(2, 12, 12))
    with pytest.raises(ValueError):
        symmetric_flows(shift, shift[:, :1])


def test_demons_displacement_follows_the_flow_convention():
    image, _, forward, _ = translating_organ(depth=3, size=48, shift=(2.0, 0.0))
    flow = demons_flow(image[1], image[0], iterations=100)
    # slice 1 = slice 0 moved by +2 rows, so slice 1 (y) samples slice 0 at y - 2.
    assert abs(float(np.median(flow[0][12:36, 12:36])) - float(forward[0, 0, 0, 0])) < 0.5


# --- losses --------------------------------------------------------------------------------------


def test_losses_and_curriculum():
    slices = torch.rand(6, 1, 16, 16)
    assert float(local_ncc_loss(slices, slices)) < 1e-2
    assert float(local_ncc_loss(slices, torch.rand(6, 1, 16, 16))) > 0.5
    zero = torch.zeros(6, 2, 16, 16)
    assert (
        float(
            neighbour_reconstruction_loss(
                slices.expand(6, 1, 16, 16)[:1].repeat(6, 1, 1, 1), zero, zero, "mse"
            )
        )
        < 1e-10
    )
    assert float(inter_slice_smoothness(zero + 1.0, zero - 2.0)) == 0
    ramp = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 16, 16)
    assert float(inter_slice_smoothness(ramp, ramp)) == pytest.approx(1.0)
    anchors = torch.tensor([0, 5])
    assert float(chain_loss(slices, zero, zero, anchors, 5, "mse")) > 0
    spans = [curriculum_span(i, 100, 20) for i in range(100)]
    assert spans[0] == 1 and spans[-1] == 19 and spans == sorted(spans)


def test_smoothness_weights_scale_for_thin_slices_only():
    settings = InstanceOptimization(iss_weight=0.1, smooth_weight=0.2)
    thin = for_slice_spacing(settings, 1.5)
    assert thin.iss_weight == pytest.approx(0.025) and thin.smooth_weight == pytest.approx(0.05)
    assert for_slice_spacing(settings, 3.0) == settings and for_slice_spacing(settings, 5.0) == settings
    assert for_slice_spacing(replace(settings, reference_spacing=0.0), 1.0).iss_weight == 0.1


@pytest.mark.parametrize("window", [1, 5, 17])
def test_box_mean_equals_average_pooling(window):
    images = torch.rand(3, 5, 40, 33, dtype=torch.float64)
    expected = torch.nn.functional.avg_pool2d(images, window, stride=1)
    assert torch.allclose(box_mean(images, window), expected, atol=1e-12)


def test_known_flows_reconstruct_the_phantom():
    image, _, forward, backward = translating_organ(depth=8, size=48)
    slices = torch.from_numpy(image)[:, None]
    exact = float(neighbour_reconstruction_loss(slices, forward, backward, "mse"))
    zero = float(
        neighbour_reconstruction_loss(slices, torch.zeros_like(forward), torch.zeros_like(forward), "mse")
    )
    assert exact < 0.8 * zero


# --- propagation and stop rule ---------------------------------------------------------------


def test_propagation_with_flows_reaches_dice_and_stops_at_the_true_extent():
    image, label, forward, backward = translating_organ()
    middle = image.shape[0] // 2
    result = propagate_slices(
        image, {middle: label[middle].astype(np.int16)}, flow_transport(forward, backward, (48, 48))
    )
    assert dice(result.labels == 1, label == 1) >= 0.85
    occupied = np.flatnonzero(label.any(axis=(1, 2)))
    extent = result.extents[0]
    assert abs(extent.first - occupied[0]) <= 2 and abs(extent.last - occupied[-1]) <= 2
    copied = propagate_slices(image, {middle: label[middle].astype(np.int16)}, copy_transport)
    assert dice(result.labels == 1, label == 1) > dice(copied.labels == 1, label == 1)
    assert not result.unsure[middle].any() and result.unsure.any()
    assert set(np.unique(result.with_ignore(2))) <= {0, 1, 2}


def test_ignore_band_grows_with_the_distance_from_the_drawing():
    image, label, forward, backward = translating_organ()
    middle = image.shape[0] // 2
    drawn = {middle: label[middle].astype(np.int16)}
    transport = flow_transport(forward, backward, (48, 48))
    fixed = propagate_slices(image, drawn, transport, ignore_band=1)
    growing = propagate_slices(image, drawn, transport, ignore_band=1, band_growth=0.5)
    np.testing.assert_array_equal(growing.labels, fixed.labels)  # only the unsure voxels change
    per_slice = growing.unsure.sum(axis=(1, 2))
    assert not growing.unsure[middle].any()
    # within one slice of the drawing the band is 1 px as before; 4 slices away it is 3 px wide
    np.testing.assert_array_equal(growing.unsure[middle + 1], fixed.unsure[middle + 1])
    assert per_slice[middle + 4] > 2 * fixed.unsure[middle + 4].sum()
    assert (growing.unsure >= fixed.unsure).all()


def test_stop_rule_on_synthetic_organs():
    from mipseg.synthetic import make_organ_volume, simulate_slice_annotation

    for seed in range(2):
        raw, label = make_organ_volume((24, 48, 48), (3.0, 1.0, 1.0), np.random.default_rng(seed))
        image = normalize_volume(raw)
        index, annotation = simulate_slice_annotation(label, "middle")
        result = propagate_slices(image, {index: annotation.astype(np.int16)}, registration_transport(image))
        occupied = np.flatnonzero(label.any(axis=(1, 2)))
        extent = result.extents[0]
        assert abs(extent.first - occupied[0]) <= 2 and abs(extent.last - occupied[-1]) <= 2
        assert dice(result.labels == 1, label == 1) >= 0.85


def test_instance_optimisation_learns_flows_that_propagate_synthetic_organs():
    from mipseg.synthetic import make_organ_volume, simulate_slice_annotation

    assert refinement_size((101, 122), 128) == (101, 122) and refinement_size((512, 256), 128) == (128, 64)
    settings = InstanceOptimization(iterations=25)
    for seed in (1,):  # one organ keeps the file fast; the stop-rule test covers two
        raw, label = make_organ_volume((24, 48, 48), (3.0, 1.0, 1.0), np.random.default_rng(seed))
        image = normalize_volume(raw)
        zero = torch.zeros(24, 2, 16, 16)  # a coarse starting grid, as the network's
        forward, backward = optimize_flows(image, zero, zero, settings)
        assert forward.shape == (24, 2, 48, 48)
        slices = torch.from_numpy(image)[:, None]
        still = torch.zeros_like(forward)
        assert float(neighbour_loss(slices, forward, backward, settings)) < float(
            neighbour_loss(slices, still, still, settings)
        )
        index, annotation = simulate_slice_annotation(label, "middle")
        result = propagate_slices(
            image, {index: annotation.astype(np.int16)}, flow_transport(forward, backward, (48, 48))
        )
        occupied = np.flatnonzero(label.any(axis=(1, 2)))
        extent = result.extents[0]
        assert abs(extent.first - occupied[0]) <= 2 and abs(extent.last - occupied[-1]) <= 2
        assert dice(result.labels == 1, label == 1) >= 0.85


def test_suggestion_candidates_lie_in_the_central_body():
    volume = np.zeros((40, 16, 16), np.float32)
    volume[5:35, 2:14, 2:14] = 0.5  # body on slices 5..34
    candidates = candidate_slices(volume)
    assert candidates.min() >= 15 and candidates.max() <= 24 and 20 in candidates


def test_two_classes_and_two_annotated_slices():
    image, label, forward, backward = translating_organ()
    annotation = label.astype(np.int16)
    annotation[:, :, :20] *= 2  # left part of the organ becomes class 2
    result = propagate_slices(
        image, {9: annotation[9], 14: annotation[14]}, flow_transport(forward, backward, (48, 48))
    )
    assert set(np.unique(result.labels)) == {0, 1, 2}
    assert {e.annotated_slice for e in result.extents} == {9, 14}
    assert np.array_equal(result.labels[9], annotation[9]) and np.array_equal(
        result.labels[14], annotation[14]
    )


def test_a_class_drawn_on_no_slice_is_recorded_as_undrawn(tmp_path, monkeypatch):
    """The report says which classes a case's drawings left out; the trainer reads it from the set."""
    from mipseg.labelset import LabelSet
    from mipseg.propagation.propagate_api import undrawn_classes

    image, label, forward, backward = translating_organ()
    annotation = label.astype(np.int16)
    annotation[:, :, :20] *= 2  # class 2 lies left of x = 20 ...
    drawn_slice = annotation[9].copy()
    drawn_slice[drawn_slice == 2] = 0  # ... and the annotator drew only class 1 on slice 9
    result = propagate_slices(image, {9: drawn_slice}, flow_transport(forward, backward, (48, 48)))
    assert undrawn_classes(result, [1, 2]) == [2]
    both = propagate_slices(image, {9: annotation[9]}, flow_transport(forward, backward, (48, 48)))
    assert undrawn_classes(both, [1, 2]) == []
    monkeypatch.setenv("MIPSEG_PREPROCESSED", str(tmp_path))
    labelset = LabelSet("Dataset990_Test", "propagated")
    labelset.folder.mkdir(parents=True)
    cases = {"a": {"undrawn_classes": [2]}, "b": {"undrawn_classes": []}, "c": {}}
    labelset.report_path.write_text(json.dumps({"cases": cases}))
    assert labelset.undrawn_classes() == {"a": (2,)}
    assert LabelSet("Dataset990_Test", "no_report").undrawn_classes() == {}


def test_two_sided_fusion_beats_the_nearer_slice_and_keeps_the_drawings():
    from mipseg.synthetic import make_organ_volume

    gains = []
    for seed in range(3):
        raw, label = make_organ_volume((24, 48, 48), (3.0, 1.0, 1.0), np.random.default_rng(seed))
        image = normalize_volume(raw)
        occupied = np.flatnonzero(label.any(axis=(1, 2)))
        low = occupied[0] + (occupied[-1] - occupied[0]) // 4
        high = occupied[0] + 3 * (occupied[-1] - occupied[0]) // 4
        drawn = {low: label[low].astype(np.int16), high: label[high].astype(np.int16)}
        transport = registration_transport(image)
        nearer = propagate_slices(image, drawn, transport, fusion="nearer")
        fused = propagate_slices(image, drawn, transport)
        for index in (low, high):
            assert np.array_equal(fused.labels[index], label[index]) and not fused.unsure[index].any()
        between = slice(low + 1, high)
        gain = dice(fused.labels[between] == 1, label[between] == 1) - dice(
            nearer.labels[between] == 1, label[between] == 1
        )
        assert gain >= -0.002, (seed, gain)
        gains.append(gain)
        # the disagreement between the two sides is left unsure, away from both drawings
        assert fused.unsure[between].sum() >= nearer.unsure[between].sum()
    assert np.mean(gains) > 0.003


def test_fusion_lets_a_class_drawn_on_one_side_only_end_between():
    image, label, forward, backward = translating_organ()
    occupied = np.flatnonzero(label.any(axis=(1, 2)))
    low, high = occupied[-1] - 4, occupied[-1] + 2  # the organ ends between the two drawings
    drawn = {low: label[low].astype(np.int16), high: label[high].astype(np.int16)}
    result = propagate_slices(image, drawn, flow_transport(forward, backward, (48, 48)))
    assert result.labels[low + 1].any() and not result.labels[high].any()
    assert dice(result.labels[low:high] == 1, label[low:high] == 1) >= 0.85


def test_verification_between_two_drawings_can_be_skipped_and_is_kept_elsewhere():
    image, label, forward, backward = translating_organ()
    occupied = np.flatnonzero(label.any(axis=(1, 2)))
    low, high = occupied[0] + 4, occupied[-1] - 4
    columns = np.arange(image.shape[2])[None, None, :]
    # a dark rim (ring intensity) on the organ's left on every slice: verification cuts it off
    dark = label.astype(bool) & (columns < 21)
    image = np.where(dark, np.float32(0.3), image)
    transport = flow_transport(forward, backward, (48, 48))
    drawn = {low: label[low].astype(np.int16), high: label[high].astype(np.int16)}
    verified = propagate_slices(image, drawn, transport)
    skipped = propagate_slices(image, drawn, transport, verify_between=False)
    between = slice(low + 1, high)
    dice_verified = dice(verified.labels[between] == 1, label[between] == 1)
    dice_skipped = dice(skipped.labels[between] == 1, label[between] == 1)
    # (the ellipsoid is wider between the drawings than on them, so even unverified runs miss a rim)
    assert dice_skipped >= 0.88 and dice_skipped > dice_verified + 0.1, (dice_skipped, dice_verified)
    # outside the drawings the stop rule still needs verification: the same labels as before
    outside = np.r_[:low, high + 1 : image.shape[0]]
    assert np.array_equal(skipped.labels[outside], verified.labels[outside])
    # a class the upper drawing leaves out ends between them: its run stays verified
    one_sided = {low: drawn[low], high: np.zeros_like(drawn[high])}
    assert np.array_equal(
        propagate_slices(image, one_sided, transport, verify_between=False).labels,
        propagate_slices(image, one_sided, transport).labels,
    )


def test_an_empty_drawn_slice_ends_the_organ_that_intensity_alone_would_carry_on():
    rows, cols = np.mgrid[:32, :32]
    disc = (rows - 16) ** 2 + (cols - 16) ** 2 < 36
    image = np.full((20, 32, 32), 0.2, np.float32)
    image[:, disc] = 0.8  # as bright past the organ's end (slice 11) as inside it
    label = np.zeros((20, 32, 32), np.int16)
    label[:12, disc] = 1
    alone = propagate_slices(image, {6: label[6]}, copy_transport)
    assert alone.labels[19].any()  # nothing in the image stops it
    stopped = propagate_slices(image, {6: label[6], 14: np.zeros((32, 32), np.int16)}, copy_transport)
    assert not stopped.labels[13:].any() and not stopped.unsure[13:].any()  # background, and sure of it
    assert np.array_equal(stopped.labels[:8], label[:8]) and not stopped.unsure[:8].any()
    # where the organ may end between the drawings, its voxels are unsure rather than called background
    assert (stopped.unsure[8:13] | (stopped.labels[8:13] == 1))[label[8:13] == 1].all()


def test_spread_slices_pick_the_cheapest_cover_deterministically():
    steps = np.abs(np.arange(10)[:, None] - np.arange(10)[None]).astype(float)
    assert spread_slices(steps, 1) == [4]  # ties: the lower index (4 and 5 reach all in 25 steps)
    chosen = spread_slices(steps, 3)
    assert chosen[0] == 4 and sorted(chosen) == [1, 4, 7]  # 8 steps in all, the optimum for 3
    assert sorted(spread_slices(steps[:2], 3)) == [0, 1]  # never more than the candidates


def test_next_slices_cover_the_extent_near_its_ends_deterministically():
    # one drawing at the centre of slices 0..10: two more at 10 % and 90 % of the extent, the optimum
    # of the cost that counts slices beyond the outermost drawings twice
    assert spread_over_extent([5], [(0, 10)], 2) == [1, 9]
    assert extent_coverage_cost([1, 5, 9], [(0, 10)]) == 12.0
    assert all(
        extent_coverage_cost([5, a, b], [(0, 10)]) >= 12.0 for a in range(11) for b in range(11) if a < b
    )
    assert spread_over_extent([5], [(0, 10)], 2) == spread_over_extent([5], [(0, 10)], 2)
    assert spread_over_extent([], [(0, 20)], 3) == [2, 10, 18]  # no drawing yet: spread evenly
    assert spread_over_extent([3], [(0, 30)], 2) == [14, 27]  # a drawing off-centre: the others fill
    assert spread_over_extent([0, 10], [(0, 10)], 1) == [5]
    assert spread_over_extent([4, 5], [(4, 6)], 5) == [6]  # only free slices of the extent
    # two organs: a small one (4..8) pulls the first new slice inward from the large one's end (0..20)
    assert spread_over_extent([10], [(0, 20), (4, 8)], 2) == [3, 18]


# --- training, resume, suggestion -------------------------------------------------------------


def test_flow_training_lowers_the_loss_with_mse_and_ncc():
    image, *_ = translating_organ(depth=8, size=32, shift=(1.5, -1.0))
    slices = torch.from_numpy(image)[:, None]
    for similarity in ("mse", "ncc"):
        torch.manual_seed(0)
        settings = train_flow.FlowTrainingSettings(
            iterations=10, similarity=similarity, learning_rate=1e-2, network=TINY_NET
        )
        model = FlowNet(TINY_NET)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        anchors = torch.tensor([2, 7])
        first, _ = train_flow.training_step_loss(model, slices, anchors, 1, settings)
        for _ in range(settings.iterations):
            loss, _ = train_flow.training_step_loss(model, slices, anchors, 1, settings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        last, _ = train_flow.training_step_loss(model, slices, anchors, 1, settings)
        assert float(last.detach()) < 0.95 * float(first.detach()), similarity


@pytest.fixture
def organ_dataset(data_roots):
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(
        991,
        "organs",
        num_cases=2,
        num_test_cases=0,
        shape=(16, 32, 32),
        spacing=(3.0, 1.0, 1.0),
        show_progress=False,
    )
    return 991


def test_interrupted_training_resumes_to_the_same_weights(organ_dataset, monkeypatch):
    from mipseg.dataset import load_dataset

    dataset = load_dataset(organ_dataset)
    settings = train_flow.FlowTrainingSettings(
        iterations=4, save_every=2, anchors_per_iteration=1, max_depth=8, network=TINY_NET
    )
    straight = torch.load(
        train_flow.train_flow_model(dataset, settings, show_progress=False), weights_only=False
    )
    folder = train_flow.flow_model_dir(organ_dataset)
    for path in folder.iterdir():
        path.unlink()
    step, calls = train_flow.training_step_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_flow, "training_step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_flow.train_flow_model(dataset, settings, show_progress=False)
    assert torch.load(folder / "checkpoint_latest.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(train_flow, "training_step_loss", step)
    resumed = torch.load(
        train_flow.train_flow_model(dataset, settings, resume=True, show_progress=False),
        weights_only=False,
    )
    for name, weights in straight["network_weights"].items():
        assert torch.allclose(weights, resumed["network_weights"][name]), name
    assert (folder / "training_log.txt").read_text().count("\n") == 5 and (folder / "progress.png").is_file()


def test_suggestions_are_deterministic(organ_dataset):
    from mipseg.propagation.suggest_api import suggest_slices

    settings = train_flow.FlowTrainingSettings(iterations=2, max_depth=8, network=TINY_NET)
    first = io.read_json(suggest_slices(organ_dataset, settings, device="cpu", show_progress=False))
    second = io.read_json(suggest_slices(organ_dataset, settings, device="cpu", show_progress=False))
    assert first == second and len(first["cases"]) == 2
    model = train_flow.load_flow_model(train_flow.flow_model_dir(organ_dataset) / "checkpoint_final.pt")
    volume = np.random.default_rng(0).random((12, 32, 32)).astype(np.float32)
    assert suggest_slice(model, volume) == suggest_slice(model, volume)
    three = io.read_json(suggest_slices(organ_dataset, settings, count=3, device="cpu", show_progress=False))
    again = io.read_json(suggest_slices(organ_dataset, settings, count=3, device="cpu", show_progress=False))
    assert three == again
    for entry in three["cases"].values():
        slices = entry["slices"]
        assert len(slices) == 3 and slices == sorted(set(slices)) and entry["slice"] == slices[0]
        assert slices[-1] - slices[0] >= 4  # spread over the central half of 16 slices, not bunched
        assert len(entry["pictures"]) == 3
    chosen, errors = suggest_spread_slices(model, volume, 3)
    assert (chosen, errors) == suggest_spread_slices(model, volume, 3) and min(np.diff(chosen)) >= 2


def test_next_slices_use_the_drawings_extent(organ_dataset):
    from mipseg.dataset import load_dataset
    from mipseg.propagation.propagate_api import PropagationSettings, propagate_case_drawings
    from mipseg.propagation.suggest_api import suggest_next_slices

    raw = paths.raw_dataset_dir(organ_dataset)
    truth, _ = io.read_image(raw / "labelsTr" / "organs_000.nii.gz")
    occupied = np.flatnonzero(truth.any(axis=(1, 2)))
    for old in (raw / "annotationsTr").glob("organs_000_slice*.png"):
        old.unlink()  # organs_000 loses its drawing: it gets the label-free choice
    settings = PropagationSettings(method="copy")
    flow = train_flow.FlowTrainingSettings(iterations=2, max_depth=8, network=TINY_NET)
    path = suggest_next_slices(
        organ_dataset, 2, settings=settings, flow_settings=flow, device="cpu", show_progress=False
    )
    first = io.read_json(path)
    assert first == io.read_json(
        suggest_next_slices(
            organ_dataset, 2, settings=settings, flow_settings=flow, device="cpu", show_progress=False
        )
    )
    drawn_case = first["cases"]["organs_001"]
    drawn, extent = drawn_case["drawn"], drawn_case["extent"]
    case = next(c for c in load_dataset(organ_dataset).cases if c.case_id == "organs_001")
    result, _, _ = propagate_case_drawings(load_dataset(organ_dataset), case, settings)
    reached = np.flatnonzero(result.labels.any(axis=(1, 2)))  # where the copied drawing is kept
    assert drawn and extent == [reached[0], reached[-1]] and extent[0] <= drawn[0] <= extent[1]
    assert drawn_case["class_extents"] == {"organ": extent}
    assert drawn_case["slices"] == spread_over_extent(drawn, [tuple(extent)], 2)
    assert not set(drawn_case["slices"]) & set(drawn) and len(drawn_case["pictures"]) == 2
    assert (paths.preprocessed_dataset_dir(organ_dataset) / drawn_case["pictures"][0]).is_file()
    fresh = first["cases"]["organs_000"]
    assert fresh["drawn"] == [] and fresh["extent"] is None and len(fresh["slices"]) == 2
    assert occupied.size  # the synthetic organ exists on organs_000
    with pytest.raises(InputError, match="--suggest-next 0"):
        suggest_next_slices(organ_dataset, 0, settings=settings, flow_settings=flow, device="cpu")


def test_interrupted_propagation_resumes_with_the_remaining_cases(organ_dataset, monkeypatch):
    from mipseg.errors import InputError
    from mipseg.propagation import propagate_api
    from mipseg.propagation.propagate_api import PropagationSettings, propagate_dataset

    settings = PropagationSettings(method="copy")
    real_case, calls = propagate_api.propagate_case, []

    def interrupted_on_second_case(dataset, case, *args, **kwargs):
        calls.append(case.case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_case(dataset, case, *args, **kwargs)

    monkeypatch.setattr(propagate_api, "propagate_case", interrupted_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        propagate_dataset(organ_dataset, name="copied", settings=settings, show_progress=False)
    folder = paths.labelset_dir(organ_dataset, "copied")
    assert list(io.read_json(folder / "report.json")["cases"]) == ["organs_000"]

    calls.clear()
    propagate_dataset(organ_dataset, name="copied", settings=settings, resume=True, show_progress=False)
    assert calls == ["organs_001"]  # the finished case is kept, not propagated again
    report = io.read_json(folder / "report.json")
    assert list(report["cases"]) == ["organs_000", "organs_001"]
    organ_dice = report["summary"]["agreement_mean"]["organ"]["dice"]
    assert (folder / "organs_001.nii.gz").is_file() and organ_dice > 0.3

    with pytest.raises(InputError, match="other settings"):
        propagate_dataset(
            organ_dataset,
            name="copied",
            settings=PropagationSettings(method="copy", ignore_band=3),
            resume=True,
            show_progress=False,
        )


def test_command_writes_the_propagated_label_set(organ_dataset, data_roots):
    from typer.testing import CliRunner

    from mipseg.cli.propagate import app

    runner = CliRunner()
    for method, name in (("flow", "propagated"), ("copy", "copied")):
        outcome = runner.invoke(
            app,
            [
                "-d",
                str(organ_dataset),
                "--method",
                method,
                "--name",
                name,
                "--iters",
                "3",
                "--refine-iters",
                "10",
                "--coarse-iters",
                "5",
            ],
        )
        assert outcome.exit_code == 0, outcome.output
        assert "(2 cases)" in outcome.output and "mean Dice against labelsTr: organ" in outcome.output
        folder = paths.labelset_dir(organ_dataset, name)
        if method == "flow":
            settings = json.loads((folder / "labelset.json").read_text())["settings"]
            assert settings["refinement"]["coarse_iterations"] == 5 and settings["symmetric_flows"]
        report = json.loads((folder / "report.json").read_text())
        assert report["method"] == method and len(report["cases"]) == 2
        assert all(case["undrawn_classes"] == [] for case in report["cases"].values())
        assert report["summary"]["agreement_mean"]["organ"]["dice"] > 0.6, report["summary"]
        labels, geometry = io.read_image(folder / "organs_000.nii.gz")
        assert labels.shape == (16, 32, 32) and geometry.spacing_zyx == (3.0, 1.0, 1.0)
        assert set(np.unique(labels)) <= {0, 1, 2}
    # a slice drawn empty past the organ's end is read as "no organ here"
    raw = paths.raw_dataset_dir(organ_dataset)
    truth, _ = io.read_image(raw / "labelsTr" / "organs_000.nii.gz")
    end = int(np.flatnonzero(truth.any(axis=(1, 2)))[-1])
    assert end + 1 < truth.shape[0]  # the synthetic organ fills about half of the depth
    io.write_png(
        np.zeros(truth.shape[1:], np.uint8), raw / "annotationsTr" / f"organs_000_slice{end + 1}.png"
    )
    outcome = runner.invoke(
        app, ["-d", str(organ_dataset), "--method", "copy", "--name", "ended", "--no-verify-between"]
    )
    assert outcome.exit_code == 0, outcome.output
    folder = paths.labelset_dir(organ_dataset, "ended")
    assert (
        end + 1 in json.loads((folder / "report.json").read_text())["cases"]["organs_000"]["annotated_slices"]
    )
    assert json.loads((folder / "labelset.json").read_text())["settings"]["verify_between"] is False
    labels, _ = io.read_image(folder / "organs_000.nii.gz")
    assert not labels[end + 1 :].any()
    bad = runner.invoke(app, ["-d", str(organ_dataset), "--method", "magic"])
    assert bad.exit_code == 2 and "--method magic" in bad.output
    bad = runner.invoke(app, ["-d", str(organ_dataset), "--refine-iters", "-1"])
    assert bad.exit_code == 2 and "--refine-iters -1" in bad.output
    bad = runner.invoke(app, ["-d", str(organ_dataset), "--coarse-iters", "-2"])
    assert bad.exit_code == 2 and "--coarse-iters -2" in bad.output
    bad = runner.invoke(app, ["-d", str(organ_dataset), "--reference-spacing", "-1"])
    assert bad.exit_code == 2 and "--reference-spacing -1.0" in bad.output
    bad = runner.invoke(app, ["-d", str(organ_dataset), "--suggest", "2", "--suggest-next", "2"])
    assert bad.exit_code == 2 and "exclude each other" in bad.output
    labelsets = paths.preprocessed_dataset_dir(organ_dataset) / "labelsets"
    before = sorted(p.name for p in labelsets.iterdir())
    bad = runner.invoke(app, ["-d", str(organ_dataset), "--suggest-next", "0", "--name", "not_asked_for"])
    assert bad.exit_code == 2 and "--suggest-next 0" in bad.output, bad.output
    assert sorted(p.name for p in labelsets.iterdir()) == before
    nxt = runner.invoke(app, ["-d", str(organ_dataset), "--suggest-next", "1", "--method", "copy"])
    assert nxt.exit_code == 0 and "suggestions written to" in nxt.output, nxt.output
    entry = io.read_json(paths.preprocessed_dataset_dir(organ_dataset) / "suggested_slices.json")["cases"]
    assert all(len(case["slices"]) == 1 and case["drawn"] for case in entry.values())
