"""Single-slice mask propagation (Flow2Mask-style): self-supervised inter-slice flows, slice
suggestion, propagation with a ground-truth-free stop rule, and registration/copy baselines.

Stage entry points live in :mod:`mipseg.propagation.propagate_api`.
"""
