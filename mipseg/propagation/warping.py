"""Warping 2D slices by dense flow fields with one coordinate convention.

Convention (used everywhere in :mod:`mipseg.propagation`)
---------------------------------------------------------
A flow is a ``(B, 2, H, W)`` tensor in **pixels**, channel 0 = row displacement ``dy``,
channel 1 = column displacement ``dx``. The flow at output pixel ``p = (y, x)`` gives the
*source* location ``p + flow[:, :, y, x]`` that is sampled (bilinearly) to produce that pixel:

    warped[y, x] = image[y + dy[y, x], x + dx[y, x]]

So warping by zero flow is the identity and warping by a constant flow ``(dy, dx)`` shifts the
content by ``(-dy, -dx)``. Pixel centres sit at integer positions ``0 .. H-1``, which is
``grid_sample(align_corners=True)``: normalised -1 is the centre of pixel 0, +1 the centre of
pixel ``H-1``. (Vol2Flow used the default ``align_corners=False`` with an ``align_corners=True``
normalisation, a half-pixel mismatch; this module avoids it.)

A SimpleITK displacement field estimated with fixed = target and moving = source follows the
same convention once its ``(x, y)`` components are swapped to ``(dy, dx)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel coordinates of a ``(height, width)`` grid.

    Returns
    -------
    torch.Tensor, shape (1, 2, height, width)
        Channel 0 = row index ``y``, channel 1 = column index ``x``, float32.
    """
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((grid_y, grid_x))[None]


def warp_slice(
    image: torch.Tensor, flow: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample ``image`` at ``p + flow(p)`` for every output pixel ``p`` (see module convention).

    Parameters
    ----------
    image : torch.Tensor, shape (B, C, H, W)
    flow : torch.Tensor, shape (B, 2, H, W)
        Displacements in pixels, channels ``(dy, dx)``.
    mode
        ``"bilinear"`` or ``"nearest"`` (grid_sample modes).
    padding_mode
        What is sampled outside the image: ``"border"`` (repeat the edge; used for images so
        reconstructions get no dark frame) or ``"zeros"`` (used for masks).

    Returns
    -------
    torch.Tensor, shape (B, C, H, W)
    """
    if image.ndim != 4 or flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"warp_slice expects (B,C,H,W) and (B,2,H,W), got {image.shape}, {flow.shape}")
    if image.shape[0] != flow.shape[0] or image.shape[2:] != flow.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and flow {tuple(flow.shape)} disagree")
    height, width = image.shape[2:]
    source = identity_grid(height, width, flow.device) + flow
    # Normalise to [-1, 1] with pixel centres at the ends (align_corners=True); a size-1 axis
    # maps to 0 whatever the displacement, which is the only sensible reading.
    norm_y = 2.0 * source[:, 0] / max(height - 1, 1) - 1.0
    norm_x = 2.0 * source[:, 1] / max(width - 1, 1) - 1.0
    grid = torch.stack((norm_x, norm_y), dim=-1)  # grid_sample wants (x, y) last
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a pixel-unit flow to another grid of the same field of view.

    The field of view is the same when pixel centres at the corners coincide
    (``align_corners=True``), so displacements scale by ``(new - 1) / (old - 1)`` per axis.

    Parameters
    ----------
    flow : torch.Tensor, shape (B, 2, h, w)
    size : (H, W)

    Returns
    -------
    torch.Tensor, shape (B, 2, H, W), in pixels of the new grid.
    """
    old_h, old_w = flow.shape[2:]
    new_h, new_w = size
    if (old_h, old_w) == (new_h, new_w):
        return flow
    resized = F.interpolate(flow, size=size, mode="bilinear", align_corners=True)
    scale = torch.tensor(
        [(new_h - 1) / max(old_h - 1, 1), (new_w - 1) / max(old_w - 1, 1)],
        dtype=flow.dtype,
        device=flow.device,
    )
    return resized * scale.view(1, 2, 1, 1)


def symmetric_flows(forward: torch.Tensor, backward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each slice pair's flow with the inverse of the opposite flow (inverse consistency).

    ``forward[i]`` (on slice ``i+1``'s grid, sampling slice ``i``) and ``backward[i+1]`` (on slice
    ``i``'s grid, sampling slice ``i+1``) describe one correspondence from both ends. To first
    order the inverse of ``backward[i+1]`` is ``-backward[i+1]`` sampled at ``p + forward[i](p)``,
    so the average of the two estimates is

        forward'[i] = 0.5 * (forward[i] - warp(backward[i+1], forward[i]))

    and symmetrically for ``backward'[i+1]``. Flows no pair uses (``forward[D-1]``,
    ``backward[0]``) are returned unchanged.

    Parameters
    ----------
    forward, backward : torch.Tensor, shape (D, 2, H, W)
        Pixel flows in the convention of this module.

    Returns
    -------
    forward, backward : torch.Tensor, shape (D, 2, H, W)
    """
    if forward.shape != backward.shape or forward.ndim != 4 or forward.shape[1] != 2:
        raise ValueError(f"symmetric_flows expects two (D,2,H,W) flows, got {forward.shape} {backward.shape}")
    used_forward, used_backward = forward[:-1], backward[1:]
    forward_out, backward_out = forward.clone(), backward.clone()
    forward_out[:-1] = 0.5 * (used_forward - warp_slice(used_backward, used_forward))
    backward_out[1:] = 0.5 * (used_backward - warp_slice(used_forward, used_backward))
    return forward_out, backward_out
