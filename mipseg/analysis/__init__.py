"""Analysis of vessel masks: centreline graph, per-branch measures, surface mesh, QC picture."""
