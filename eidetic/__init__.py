"""Eidetic core: framework-free memorization algorithms over tensors.

Everything here is plain torch/numpy (diffusers models are accepted as callables).
Lightning modules and callbacks schedule these functions, feed them and log them.
"""

__version__ = "0.1.0"
