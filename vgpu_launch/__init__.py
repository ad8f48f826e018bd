"""vgpu-launch: keep a preload library in every process of a service's tree."""

__version__ = "0.1.0"
