"""Prediction: sliding windows, fold ensembles, export back to the raw grid (``mipseg_predict``)."""
