"""Rebuilding a teacher network from its recorded architecture and weights, and checking it.

`build_and_load` is the one way every teacher format becomes a module: build the class named in
the file from its recorded init_kwargs, load the weights with strict=True, and run one small
forward pass (`forward_check`) that must return the input's shape and finite values.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from apctl.errors import ApctlError, first_line


def positional_to_kwargs(class_name: str, args: tuple, kwargs: dict) -> dict:
    """`kwargs` plus the positional constructor `args` bound to their parameter names.

    EDM records `()`; a pickle from other code may record positional arguments, which apctl's
    architecture JSON stores by name. A `model_kwargs` catch-all is flattened into the result.
    """
    if not args:
        return kwargs
    from apctl.networks import NETWORK_CLASSES

    cls = NETWORK_CLASSES.get(class_name.rsplit(".", 1)[-1])
    if cls is None:
        raise ApctlError(f"unknown network class {class_name!r}")
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise ApctlError(f"cannot match {class_name}'s recorded constructor arguments: {exc}") from None
    out = dict(bound.arguments)
    out.pop("self", None)
    extra = out.pop("model_kwargs", None) or {}
    out.update(extra)
    return out


def _check_state_dict(network, state_dict: Mapping[str, Any], what: str) -> None:
    own = network.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ApctlError(f"{what}: weights do not match the {type(network).__name__} built from its "
                         f"init_kwargs: {'; '.join(parts)}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ApctlError(f"{what}: {key} has shape {list(value.shape)}, the network expects "
                             f"{list(own[key].shape)}")


def _has_meta_tensors(network) -> bool:
    import torch

    for module in network.modules():
        for value in list(module._parameters.values()) + list(module._buffers.values()) + list(vars(module).values()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                return True
    return False


def _build(class_name: str, init_kwargs: dict, what: str, device=None):
    from apctl.networks import build_network

    try:
        return build_network(class_name, init_kwargs, device=device)
    except ApctlError as exc:
        raise ApctlError(f"{what}: {exc}") from None
    except Exception as exc:  # the constructor rejected a recorded argument
        raise ApctlError(f"{what}: cannot build {class_name} from its init_kwargs "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def build_and_load(class_name: str, init_kwargs: dict, state_dict: Mapping[str, Any], what: str):
    """Rebuild the network and load `state_dict` with strict=True, then check one forward pass.

    The module is first built on the meta device and the weights assigned (no random
    initialisation of weights that are overwritten anyway); networks whose constructors compute
    values from tensors (VPPrecond, iDDPMPrecond) or keep tensors outside the state_dict are
    built normally and the weights copied in.
    """
    network = None
    try:
        network = _build(class_name, init_kwargs, what, device="meta")
    except ApctlError:
        pass
    if network is not None:
        _check_state_dict(network, state_dict, what)
        own = network.state_dict()
        try:
            network.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        except RuntimeError as exc:
            raise ApctlError(f"{what}: load_state_dict failed: {first_line(exc)}") from None
        if _has_meta_tensors(network):
            network = None
    if network is None:
        network = _build(class_name, init_kwargs, what)
        _check_state_dict(network, state_dict, what)
        try:
            network.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise ApctlError(f"{what}: load_state_dict failed: {first_line(exc)}") from None
    network.eval().requires_grad_(False)
    forward_check(network, what)
    return network


def forward_check(network, what: str) -> None:
    """One small forward pass: the output must have the input's shape and be finite."""
    import torch

    res = int(getattr(network, "img_resolution", 0) or 0)
    ch = int(getattr(network, "img_channels", 0) or 0)
    if not res or not ch:
        return
    label_dim = int(getattr(network, "label_dim", 0) or 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, ch, res, res, generator=gen)
    labels = torch.nn.functional.one_hot(torch.tensor([0]), label_dim).float() if label_dim else None
    try:
        with torch.no_grad():
            if hasattr(network, "sigma_data") or hasattr(network, "round_sigma"):
                out = network(x, torch.tensor([1.0]), labels)
            else:  # a raw UNet
                out = network(x, torch.zeros(1), labels)
    except Exception as exc:
        raise ApctlError(f"{what}: the rebuilt network fails on a test input: {first_line(exc)}") from None
    if out.shape[0] != 1 or tuple(out.shape[2:]) != tuple(x.shape[2:]):
        raise ApctlError(f"{what}: the rebuilt network returns shape {list(out.shape)} for input {list(x.shape)}")
    if not torch.isfinite(out).all():
        raise ApctlError(f"{what}: the rebuilt network returns non-finite values on a test input")

