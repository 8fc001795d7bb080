"""Every BatchNorm CNN in torchvision (and timm's common families) gets gates, is cut to half
its MACs in both scopes, runs and reloads weights-only with identical outputs.

A fast subset covers each hard structure (grouped convs, depthwise + squeeze-excitation,
channel shuffle, branches split and concatenated); the rest runs under ``-m slow``.
"""

import importlib.util
import os

import pytest
import torch.nn as nn
import torchvision

from nam_prune.check import LEAST_MACS_KEEP, SMALLEST_SIZE, TIMM_SWEEP, TOO_BIG, check_model

MACS_KEEP = 0.5
FAST = {
    "resnet18",  # residual adds
    "mobilenet_v3_small",  # depthwise, squeeze-excitation, hard-swish
    "shufflenet_v2_x0_5",  # channel split and shuffle (traced through a stand-in)
}  # grouped convolutions: timm's regnetx_002 below; under -m slow: mnasnet0_5 (narrow depthwise, 6 s),
# googlenet (inception concat, 8 s) and regnet_y_400mf (11 s)
WITHOUT_BN = {"alexnet", "squeezenet1_0"}  # fast representatives of the LayerNorm / no-norm designs

TORCHVISION = torchvision.models.list_models(torchvision.models)


def _has_batchnorm(name: str) -> bool:
    return not name.startswith(("alexnet", "convnext", "squeezenet", "swin", "vit")) and name not in {
        "vgg11", "vgg13", "vgg16", "vgg19",
    }


def _params(names):
    return [pytest.param(n, marks=() if n in FAST | WITHOUT_BN else pytest.mark.slow) for n in names if n not in TOO_BIG]


def _assert_pruned(name: str) -> None:
    keep = LEAST_MACS_KEEP.get(name, MACS_KEEP)
    result = check_model(name, SMALLEST_SIZE.get(name, 64), keep)
    assert result.status == "ok", result.status
    # local scope cuts every layer by one share, in steps of a whole position per conv group (1/8
    # of a RegNet layer with group width 8), so it may land further below the target than global
    for scope, margin in (("global", 0.02), ("local", 0.1)):
        share = result.macs_after[scope] / result.macs_before
        assert keep - margin <= share <= keep, (scope, share)
        assert result.params_after[scope] < result.params_before
    assert result.reload_max_abs_diff <= 1e-6


@pytest.mark.slow  # builds each listed torchvision model (6 s)
def test_the_sweep_knows_which_models_have_batchnorm():
    """The list below is what the sweep expects; it must match the real modules."""
    for name in (*FAST, *WITHOUT_BN, "vgg11", "vgg11_bn", "convnext_tiny"):
        model = torchvision.models.get_model(name, weights=None)
        assert _has_batchnorm(name) == any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), name


@pytest.mark.parametrize("name", _params(n for n in TORCHVISION if _has_batchnorm(n)))
def test_torchvision_model_prunes_to_half_its_macs(name):
    _assert_pruned(name)


@pytest.mark.parametrize("name", _params(n for n in TORCHVISION if not _has_batchnorm(n)))
def test_model_without_batchnorm_is_a_one_line_error(name):
    result = check_model(name, 64)
    assert "no BatchNorm2d found" in result.status and "\n" not in result.status


TIMM_FAST = {  # regnetx_002: grouped convolutions (group width 8); resnest14d: split attention (split-and-merge);
    "regnetx_002", "resnest14d", "inception_next_atto",  # ghostnet_100 (8 s) and resnet18d (residual, as resnet18) run under -m slow
}


@pytest.mark.skipif(
    importlib.util.find_spec("timm") is None and os.environ.get("CI") != "true",
    reason="timm not installed (pip install 'nam-prune[timm]'); CI installs it and runs these",
)
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in TIMM_FAST else pytest.mark.slow) for n in TIMM_SWEEP])
def test_timm_model_prunes_to_half_its_macs(name):
    _assert_pruned(f"timm:{name}")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
@pytest.mark.parametrize(
    ("name", "size", "block"),
    [
        ("xcit_nano_12_p8_224", 64, "XCiT: attention and token width (12)"),
        pytest.param("levit_128s", 224, "LeViT: attention heads (11)", marks=pytest.mark.slow),
    ],
)
def test_attention_whose_heads_cannot_follow_a_cut_is_kept_whole_and_named(name, size, block):
    """Their heads split at widths the forward reads off the input or stores: a cut inside would
    break the model, so it stays, and a target out of reach says what was kept whole."""
    result = check_model(f"timm:{name}", size)
    assert result.status.startswith("cannot reach") and f"kept whole: {block}" in result.status, result.status
    assert result.kept_whole == {block.rsplit(" (", 1)[0]: int(block.rsplit("(", 1)[1].rstrip(")"))}
