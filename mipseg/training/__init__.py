"""Training: network from the plans, partial-label losses, data loading, the training loop.

``mipseg_train`` calls :func:`mipseg.training.train_api.train_fold`; the network builder
(:func:`mipseg.training.network.build_network`) and the checkpoint format
(:mod:`mipseg.training.checkpoint`) are shared with prediction.
"""
