"""attncc's version (a leaf module: generated kernels and dumps record it)."""

__version__ = "0.1.0"
