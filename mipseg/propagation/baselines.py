"""Baseline transports for :func:`mipseg.propagation.propagate.propagate_slices`.

- ``copy``: the mask of the previous slice unchanged (nearest-slice copy).
- ``registration``: SimpleITK fast symmetric-forces Demons between neighbouring slices,
  fixed = target slice, moving = source slice; the displacement field maps a target pixel to
  its source location, which is the flow convention of :mod:`mipseg.propagation.warping` once
  its ``(x, y)`` components are swapped to ``(dy, dx)``.

Both go through the same verification and stop rule as the learned flows.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from mipseg.propagation.propagate import Transport
from mipseg.propagation.warping import warp_slice

TRANSPORT_METHODS = ("flow", "registration", "copy")


def copy_transport(masks: np.ndarray, source: int, target: int) -> np.ndarray:
    """Nearest-slice copy: the masks ``(K, H, W)`` move unchanged."""
    return masks.copy()


def demons_flow(
    fixed: np.ndarray, moving: np.ndarray, *, iterations: int = 50, smoothing: float = 1.5
) -> np.ndarray:
    """Demons displacement from ``fixed`` to ``moving`` slices ``(H, W)`` as a ``(2, H, W)`` flow (dy, dx).

    Parameters
    ----------
    iterations
        Demons iterations.
    smoothing
        Standard deviation (pixels) of the Gaussian smoothing of the displacement field.
    """
    fixed_image = sitk.GetImageFromArray(np.ascontiguousarray(fixed, dtype=np.float32))
    moving_image = sitk.GetImageFromArray(np.ascontiguousarray(moving, dtype=np.float32))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing)
    field = demons.Execute(fixed_image, moving_image)
    displacement = sitk.GetArrayFromImage(field)  # (H, W, 2) with components (x, y)
    return np.stack((displacement[..., 1], displacement[..., 0])).astype(np.float32)


def registration_transport(image: np.ndarray, *, iterations: int = 50, smoothing: float = 1.5) -> Transport:
    """Transport masks between neighbouring slices of ``image`` ``(D, H, W)`` by Demons registration.

    Each slice pair is registered once and cached, so several classes share the work.
    """
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def transport(masks: np.ndarray, source: int, target: int) -> np.ndarray:
        if (source, target) not in cache:
            flow = demons_flow(image[target], image[source], iterations=iterations, smoothing=smoothing)
            cache[(source, target)] = torch.from_numpy(flow)[None]
        moved = warp_slice(
            torch.from_numpy(masks[None].astype(np.float32)), cache[(source, target)], padding_mode="zeros"
        )
        return moved[0].numpy()

    return transport
