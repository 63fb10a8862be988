"""Synthetic datasets with known truth: vessel trees (MIP annotations) and organs (slice annotations).

``synthesize_dataset`` writes a complete raw dataset; the in-memory generators and the
annotation simulators are public so tests of later stages can build volumes directly.
"""

from mipseg.synthetic.annotation import (
    best_threshold_dice,
    simulate_mip_annotation,
    simulate_slice_annotation,
)
from mipseg.synthetic.organs import make_organ_volume
from mipseg.synthetic.vessels import Centreline, make_vessel_volume, make_vessel_volume_with_centrelines
from mipseg.synthetic.writer import KINDS, annotate_suggested_slices, synthesize_dataset, synthetic_geometry

__all__ = [
    "Centreline",
    "KINDS",
    "annotate_suggested_slices",
    "best_threshold_dice",
    "make_organ_volume",
    "make_vessel_volume",
    "make_vessel_volume_with_centrelines",
    "simulate_mip_annotation",
    "simulate_slice_annotation",
    "synthesize_dataset",
    "synthetic_geometry",
]
