"""Training: network from the plans, partial-label losses, data loading, the training loop.

``mipseg_train`` calls :func:`mipseg.training.train_api.train_fold`; the loop is
:mod:`mipseg.training.loop`, the ``--trainer`` registry :mod:`mipseg.training.trainer_registry`, the
log and ``progress.png`` :mod:`mipseg.training.training_log`. The network builder
(:func:`mipseg.training.network.build_network`) and the checkpoint format
(:mod:`mipseg.training.checkpoint`) are shared with prediction.
"""
