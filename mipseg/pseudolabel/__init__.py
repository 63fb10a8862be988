"""MIP annotations -> 3D pseudo-label sets (seeds S_p, foreground S_1, background S_0).

:mod:`.mip_backprojection` holds the pure array rule; :mod:`.pseudolabel_api` the stage that reads a
dataset and writes the label set ``labelsets/{name}/``.
"""

from mipseg.pseudolabel.mip_backprojection import agreement_with_truth, pseudo_label_volume
from mipseg.pseudolabel.pseudolabel_api import PseudoLabelSettings, make_pseudo_labels

__all__ = ["PseudoLabelSettings", "agreement_with_truth", "make_pseudo_labels", "pseudo_label_volume"]
