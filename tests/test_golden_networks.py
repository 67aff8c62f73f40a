"""apctl's EDM networks against golden outputs of NVIDIA's reference implementation (NVlabs/edm).

tests/data/edm-networks/ holds, for three small networks (VPPrecond + DDPM++, VEPrecond + NCSN++,
EDMPrecond + ADM), the reference network's state_dict, inputs and its output D = net(x, σ, labels) in
eval mode; README.md there says where the numbers come from. The independent statement: the same
class name, constructor arguments and weights give the same function, to float32 round-off.

Measured here (max |ΔD| / max |D|): ddpmpp-vp-cond 6.0e-8, ncsnpp-ve-uncond 6.6e-8, adm-edm-cond 3.8e-8.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apctl.networks.registry import build_network, count_parameters

GOLDEN = Path(__file__).resolve().parent / "data" / "edm-networks"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
TOLERANCE = 1e-6          # the README's expectation for a faithful float32 implementation


def _golden(name: str):
    """(network built from the manifest with the golden weights loaded strictly, the file's tensors)."""
    entry = MANIFEST[name]
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    assert set(k.split(".", 1)[0] for k in tensors) <= {"param", "input", "output"}, sorted(tensors)
    net = build_network(entry["class_name"], entry["init_kwargs"])
    net.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True)
    return net.eval(), tensors


def _relative_error(net, tensors, sigma=None) -> float:
    with torch.no_grad():
        D = net(tensors["input.x"], tensors["input.sigma"] if sigma is None else sigma,
                tensors.get("input.class_labels"))
    ref = tensors["output.D"]
    assert D.shape == ref.shape and D.dtype == ref.dtype
    return float((D - ref).abs().max() / ref.abs().max())


def test_golden_set_is_complete():
    """The three networks of the README are there, each with its inputs, output and manifest entry."""
    assert set(MANIFEST) == {"ddpmpp-vp-cond", "ncsnpp-ve-uncond", "adm-edm-cond"}
    for name, entry in MANIFEST.items():
        tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
        assert tensors["input.x"].shape == tensors["output.D"].shape == (5, 3, 16, 16)
        assert ("input.class_labels" in tensors) == (entry["init_kwargs"]["label_dim"] > 0)
        assert float(tensors["output.D"].abs().max()) == entry["output_abs_max"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_network_reproduces_reference_output(name):
    """Same class, init_kwargs and weights as EDM's reference ⇒ same parameter count and same D (≤ 1e-6 relative)."""
    net, tensors = _golden(name)
    assert count_parameters(net) == MANIFEST[name]["parameters"]
    error = _relative_error(net, tensors)
    print(f"{name}: max |ΔD| / max |D| = {error:.2e}")
    assert error <= TOLERANCE, error


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_comparison_is_sensitive(name):
    """Guard: the comparison notices a wrong input (σ given to the wrong samples) by orders of magnitude."""
    net, tensors = _golden(name)
    assert _relative_error(net, tensors, sigma=tensors["input.sigma"].roll(1)) >= 1e3 * TOLERANCE
