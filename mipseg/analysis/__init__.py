"""Analysis of vessel masks: centreline graph, per-branch measures, surface mesh, QC picture.

The stage after prediction (it may read any earlier layer; nothing imports it). The API is in
:mod:`mipseg.analysis.analyze_api`; this module stays light so the command line can import it.
"""

# End branches shorter than this many radii at their branch point are spurs; on the synthetic
# benchmark 2.0 measured fewer spurious branches than 1.0 or 1.5 and found as many true ones,
# 3.0 began to lose true branches (documentation/analyze_experiments.md).
DEFAULT_SPUR_FACTOR = 2.0
