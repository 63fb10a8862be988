"""mipseg: self-configuring 3D segmentation from cheap 2D annotations."""

__version__ = "0.1.0"
