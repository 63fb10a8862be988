"""Refinement (``mipseg_refine``): out-of-fold models clean a label set into a new one.

Confident learning + uncertainty (Guo et al., IEEE TMI 2024): :mod:`.rules` holds the rules as pure
array functions, :mod:`.refine_api` the stage that reads the fold models of ``mipseg_train`` and writes
the refined label set. A stage after training and inference: it may import both, neither imports it.
"""
