"""Networks as functions of one flat parameter vector (torch.func.functional_call).

Expert trajectories store flat vectors [P]; trajectory matching unrolls student steps on them.
The order is `net.named_parameters()`; buffers (e.g. BatchNorm statistics) are not included.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def param_shapes(net: nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every parameter, in flattening order."""
    return [(name, p.shape) for name, p in net.named_parameters()]


def flatten_params(net: nn.Module) -> torch.Tensor:
    """All parameters of `net` as one detached float32 vector [P]."""
    return torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])


def unflatten(net: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat vector [P] into a name -> tensor dict shaped like `net`'s parameters."""
    out, offset = {}, 0
    for name, shape in param_shapes(net):
        n = shape.numel()
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, network needs {offset}")
    return out


def functional_forward(net: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """net(x) [B, classes] with parameters taken from the flat vector (differentiable in both)."""
    return functional_call(net, unflatten(net, flat), (x,))


def load_flat(net: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat vector into `net`'s parameters in place; returns `net`."""
    with torch.no_grad():
        for p, value in zip(net.parameters(), unflatten(net, flat).values(), strict=True):
            p.copy_(value)
    return net
