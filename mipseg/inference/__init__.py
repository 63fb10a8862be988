"""Prediction: fold ensembles, export back to the raw grid (``mipseg_predict``).

The sliding window itself is shared (:mod:`mipseg.sliding_window`).
"""
