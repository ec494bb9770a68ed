"""A helper object in a module of its own (no forward of it is traced): torchvision's
``BoxCoder`` asserts ``isinstance(rel_codes, torch.Tensor)`` in a plain method."""

from __future__ import annotations

import torch


class Decoder:
    def __init__(self, scale: float):
        self.scale = scale

    def decode(self, codes):
        torch._assert(isinstance(codes, torch.Tensor), "This function expects codes of type torch.Tensor.")
        return codes * self.scale


class Boxes:
    """torchvision's ``ImageList``: a plain object holding tensors, returned by a forward."""

    def __init__(self, tensors: torch.Tensor, sizes: list):
        self.tensors = tensors
        self.sizes = sizes
