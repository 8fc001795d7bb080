"""The NAM gates reproduce the published formulas exactly, without the reference's permutes."""

import copy
import os
import shlex
import shutil
import sys
import time

import pytest
import torch
import torch.nn as nn

from nam_prune import gate_kernel
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMGated, NAMSpatialGate, _uses_batch_statistics

SHAPES = [(4, 8, 5, 5), (2, 16, 7, 3), (8, 3, 1, 1), (3, 32, 4, 6)]


class ReferenceChannelAtt(nn.Module):
    """The reference ``Channel_Att`` (Christian-lyc/NAM), written out with its permutes."""

    def __init__(self, channels: int, detach: bool = True):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels, affine=True)
        self.detach = detach

    def forward(self, x):
        residual = x
        x = self.bn2(x)
        gamma = self.bn2.weight.data if self.detach else self.bn2.weight
        weight_bn = gamma.abs() / torch.sum(gamma.abs())
        x = x.permute(0, 2, 3, 1).contiguous()
        x = torch.mul(weight_bn, x)
        x = x.permute(0, 3, 1, 2).contiguous()
        return torch.sigmoid(x) * residual


class ReferencePixelAtt(nn.Module):
    """Pixel normalization written the slow way: BatchNorm1d over H*W features of a permuted tensor."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(height * width, affine=True)

    def forward(self, x):
        n, c, h, w = x.shape
        pixels = x.reshape(n, c, h * w).permute(0, 2, 1).contiguous()  # (N, HW, C)
        normed = self.bn(pixels)
        lam = self.bn.weight.data
        weighted = normed * (lam.abs() / lam.abs().sum()).view(1, -1, 1)
        return torch.sigmoid(weighted.permute(0, 2, 1).reshape(n, c, h, w)) * x


def _forward_backward_both(ours, ref, shape, generator):
    """Same input and upstream gradient through both modules; returns both inputs and outputs."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_ref = ours(x_ours), ref(x_ref)
    upstream = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64)
    (out_ours * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    torch.testing.assert_close(out_ours, out_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-6, rtol=0)


def _randomize_bn(bn_weight, bn_bias, generator):
    with torch.no_grad():
        bn_weight.copy_(torch.randn(bn_weight.shape, generator=generator))
        bn_bias.copy_(torch.randn(bn_bias.shape, generator=generator))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("grad_through_weights", [False, True])
def test_channel_gate_matches_reference(shape, train, grad_through_weights):
    g = torch.Generator().manual_seed(0)
    ours = NAMChannelGate(shape[1], grad_through_weights=grad_through_weights).double()
    ref = ReferenceChannelAtt(shape[1], detach=not grad_through_weights).double()
    _randomize_bn(ours.bn.weight, ours.bn.bias, g)
    ref.load_state_dict({k.replace("bn.", "bn2."): v for k, v in ours.state_dict().items()})
    if not train:  # give the running statistics non-trivial values first
        x_warm = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
        ours.train()(x_warm), ref.train()(x_warm)
    ours.train(train), ref.train(train)
    _forward_backward_both(ours, ref, shape, g)
    torch.testing.assert_close(ours.bn.weight.grad, ref.bn2.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bn.bias.grad, ref.bn2.bias.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bn.running_mean, ref.bn2.running_mean, atol=1e-6, rtol=0)


def test_grad_through_weights_changes_gamma_gradient():
    """With w detached gamma learns only through BN(x); the option adds the path through w."""
    x = torch.randn(4, 6, 3, 3)
    detached, flowing = NAMChannelGate(6), NAMChannelGate(6, grad_through_weights=True)
    flowing.load_state_dict(detached.state_dict())
    with torch.no_grad():
        for gate in (detached, flowing):
            gate.bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
    detached(x).sum().backward()
    flowing(x).sum().backward()
    assert not torch.allclose(detached.bn.weight.grad, flowing.bn.weight.grad, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_spatial_gate_matches_pixel_batchnorm(shape, train):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(1)
    ours = NAMSpatialGate(h, w).double()
    ref = ReferencePixelAtt(h, w).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(h, w, generator=g))
        ours.bias.copy_(torch.randn(h, w, generator=g))
        ref.bn.weight.copy_(ours.weight.flatten())
        ref.bn.bias.copy_(ours.bias.flatten())
    if not train:
        x_warm = torch.randn(shape, generator=g, dtype=torch.float64) * 2 - 1
        ours.train()(x_warm), ref.train()(x_warm)
        torch.testing.assert_close(ours.running_var.flatten(), ref.bn.running_var, atol=1e-6, rtol=0)
    ours.train(train), ref.train(train)
    _forward_backward_both(ours, ref, shape, g)
    torch.testing.assert_close(ours.weight.grad.flatten(), ref.bn.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bias.grad.flatten(), ref.bn.bias.grad, atol=1e-6, rtol=0)


def test_spatial_gate_rejects_other_input_size():
    gate = NAMSpatialGate(8, 8)
    with pytest.raises(NamPruneError, match="built for 8x8 inputs but got 16x16"):
        gate(torch.randn(2, 4, 16, 16))


def test_eval_gate_folds_to_affine_sigmoid():
    """At inference the gate is x * sigmoid(a x + b); it equals the unfolded BN path."""
    gate = NAMChannelGate(16)
    with torch.no_grad():
        gate.bn.weight.uniform_(-2, 2)
        gate.bn.bias.uniform_(-1, 1)
    gate.train()(torch.randn(8, 16, 6, 6) * 2 + 0.5)
    gate.eval()
    x = torch.randn(4, 16, 6, 6)
    folded = gate(x)
    gate.tracing = True
    torch.testing.assert_close(folded, gate(x), atol=1e-6, rtol=1e-6)


def _gated_pair(closing: bool, grad_through_weights: bool, host: str, channels: int = 16):
    """A gated layer with random BN parameters and statistics, and a copy forced onto the plain path."""
    gate = NAMChannelGate(channels, grad_through_weights=grad_through_weights, closing=closing)
    fused = NAMGated(nn.BatchNorm2d(channels) if host == "bn" else nn.SiLU(), gate)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(channels, generator=g) * 4 - 2)
            bn.bias.copy_(torch.rand(channels, generator=g) * 2 - 1)
            bn.running_mean.copy_(torch.rand(channels, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    plain = copy.deepcopy(fused)
    plain.channel.fused_training = lambda x: False
    return fused.train(), plain.train()


def _train_step_differences(fused: nn.Module, plain: nn.Module, shape, dtype) -> dict[str, float]:
    g = torch.Generator().manual_seed(4)
    # channels with different spreads and offsets; in float64 a few nearly constant ones too, where
    # the eps matter (their 1/std amplifies float32 rounding past any fixed tolerance, in both paths)
    spread = torch.rand(1, shape[1], 1, 1, generator=g) * 3 + 0.1
    if dtype == torch.float64:
        spread[0, :3] = 1e-3
    x = (torch.randn(shape, generator=g) * spread + torch.randn(1, shape[1], 1, 1, generator=g)).to(dtype)
    upstream = torch.randn(shape, generator=g).to(dtype)
    fused, plain = fused.to(dtype), plain.to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fused, out_plain = fused(xa), plain(xb)
    (out_fused * upstream).sum().backward()
    (out_plain * upstream).sum().backward()
    reference_params, reference_buffers = dict(plain.named_parameters()), dict(plain.named_buffers())
    pairs = {
        "output": (out_fused, out_plain),
        "input grad": (xa.grad, xb.grad),
        **{f"{n} grad": (p.grad, reference_params[n].grad) for n, p in fused.named_parameters()},
        **{n: (b.double(), reference_buffers[n].double()) for n, b in fused.named_buffers()},
    }
    # differences relative to the tensor's scale (max |value|, at least 1): float rounding grows with it
    return {n: ((a - b).abs().max() / b.abs().max().clamp_min(1)).item() for n, (a, b) in pairs.items()}


@pytest.mark.parametrize("closing", [True, False])
@pytest.mark.parametrize("grad_through_weights", [False, True])
def test_fused_training_gate_matches_plain_path(closing, grad_through_weights):
    """One batch-statistics pass serves the host BN and its gate: outputs, gradients and running
    statistics equal the plain modules' (float64 within 1e-8, float32 within 1e-5, relative to each
    tensor's largest value). A gate without a host BN trains eagerly on the plain path itself."""
    for dtype, tolerance in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
        fused, plain = _gated_pair(closing, grad_through_weights, "bn")
        differences = _train_step_differences(fused, plain, (8, 16, 7, 7), dtype)
        assert max(differences.values()) <= tolerance, differences


def test_fused_training_gate_skips_layers_without_batch_statistics():
    """Frozen (eval) host BNs and single-value channels take the plain path, which behaves as BN does."""
    fused, plain = _gated_pair(closing=True, grad_through_weights=False, host="bn")
    fused.host.eval()
    assert not _uses_batch_statistics(fused.host, torch.randn(2, 16, 4, 4))
    assert _train_step_differences(fused, plain.train(), (2, 16, 4, 4), torch.float64)["output"] > 0  # plain's host trains
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _gated_pair(closing=True, grad_through_weights=False, host="bn")[0](torch.randn(1, 16, 1, 1))


@pytest.fixture
def kernel():
    """The fused CPU gate kernel, which Linux machines with a C compiler build (CI has gcc)."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if not compiler or not shutil.which(compiler[0]):
        pytest.skip("no C compiler: training gates run on torch ops")
    if not gate_kernel.applies(torch.zeros(2, 3, 4, 4)):
        if sys.platform.startswith("linux"):
            pytest.fail(gate_kernel.status())
        pytest.skip(gate_kernel.status())  # e.g. a compiler without OpenMP


@pytest.mark.parametrize("host", ["bn", "silu"])
@pytest.mark.parametrize("shape", [(8, 16, 7, 7), (2, 5, 33, 37), (3, 24, 1, 2)])  # 33 x 37 > one 1024-value chunk
def test_gate_kernel_matches_plain_path_and_torch_ops(kernel, host, shape):
    """The kernel's four passes give the plain modules' outputs, gradients and running statistics
    within 1e-5, as the torch-op form of the same fused gate does, for a gate behind a host BN
    and one on its own (as in YOLO)."""
    fused, plain = _gated_pair(True, False, host, channels=shape[1])
    on_kernel = _train_step_differences(fused, plain, shape, torch.float32)
    assert max(on_kernel.values()) <= 1e-5, on_kernel
    fused, plain = _gated_pair(True, False, host, channels=shape[1])
    with gate_kernel.disabled():
        on_torch_ops = _train_step_differences(fused, plain, shape, torch.float32)
    assert max(on_torch_ops.values()) <= 1e-5, on_torch_ops


def test_gate_kernel_reads_channel_slices_of_a_concat_gradient(kernel):
    """Behind torch.cat (YOLO's C2f) a gate's upstream gradient is a channel slice of a larger one; the
    kernel reads it in place (no copy) and still matches the plain modules."""
    shape = (4, 8, 6, 5)
    fused, plain = _gated_pair(True, False, "silu", channels=8)
    g = torch.Generator().manual_seed(6)
    x, other = torch.randn(shape, generator=g), torch.randn(4, 3, 6, 5, generator=g)
    upstream = torch.randn(4, 11, 6, 5, generator=g)
    grads, outputs = [], []
    for module in (fused, plain):
        xi = x.clone().requires_grad_()
        out = torch.cat([other, module(xi)], 1)
        (out * upstream).sum().backward()
        outputs.append(out)
        grads.append([xi.grad, *(p.grad for p in module.parameters())])
    slice_of_upstream = upstream[:, 3:]
    assert not slice_of_upstream.is_contiguous() and gate_kernel._planar(slice_of_upstream) is slice_of_upstream
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_gate_kernel_refuses_a_second_derivative(kernel):
    """Its gradients carry no graph: double backward raises instead of returning zeros."""
    fused, _ = _gated_pair(True, False, "silu", channels=8)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_gate_kernel_skips_what_it_cannot_run(kernel):
    """channels_last and float64 maps (and any map while the kernel is off) take the torch-op form, exactly."""
    x = torch.randn(2, 8, 5, 5)
    assert gate_kernel.applies(x)
    assert not gate_kernel.applies(x.to(memory_format=torch.channels_last))
    assert not gate_kernel.applies(x.double())
    with gate_kernel.disabled():
        assert not gate_kernel.applies(x)
    fused, plain = _gated_pair(True, False, "bn", channels=8)
    fused, plain = fused.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    differences = _train_step_differences(fused, plain, (2, 8, 5, 5), torch.float32)
    assert max(differences.values()) <= 1e-5, differences


def test_gate_kernel_without_a_compiler_falls_back_to_torch_ops(monkeypatch):
    """No compiler: status says so and gates train on torch ops with the same numbers."""
    monkeypatch.setenv("CC", "no-such-compiler")
    gate_kernel._load.cache_clear()
    try:
        assert gate_kernel.status().startswith("torch ops (no C compiler 'no-such-compiler'")
        assert not gate_kernel.applies(torch.randn(2, 8, 5, 5))
        fused, plain = _gated_pair(True, False, "bn", channels=8)
        assert max(_train_step_differences(fused, plain, (4, 8, 5, 5), torch.float32).values()) <= 1e-5
    finally:
        gate_kernel._load.cache_clear()


def test_gate_kernel_cache_survives_a_failed_build(monkeypatch, tmp_path):
    """A compiler that fails leaves no library in the cache (built beside it, renamed when done), and
    a build folder a killed process left an hour ago is removed."""
    compiler = tmp_path / "failing-cc"
    compiler.write_text("#!/bin/sh\necho 'cc: error: unsupported option' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels = tmp_path / "cache" / "nam-prune" / "kernels"
    stale, fresh = kernels / "build-killed", kernels / "build-running"  # a killed build's folder, a running one's
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "gate_kernel.so").write_bytes(b"half")
    os.utime(stale, (time.time() - 2 * gate_kernel.STALE_BUILD_S,) * 2)
    gate_kernel._load.cache_clear()
    try:
        assert gate_kernel.status() == "torch ops (the fused gate kernel did not build: cc: error: unsupported option)"
        assert not stale.exists() and fresh.exists()
        assert not any(p.is_file() for p in kernels.glob("*"))
    finally:
        gate_kernel._load.cache_clear()


@pytest.mark.slow
def test_compiled_training_gate_matches_plain_path_without_recompiling():
    """nam.compile: one dynamic-shape graph per gate form serves every layer shape, exactly."""
    from torch._dynamo.utils import counters

    from nam_prune.gates import use_compiled_gates

    torch._dynamo.reset()
    counters.clear()
    use_compiled_gates(True)
    try:
        for host in ("bn", "none"):  # a gate behind a host BN, and one on its own (as in YOLO)
            for shape in [(8, 16, 7, 7), (4, 24, 9, 5), (2, 40, 3, 3), (8, 16, 12, 12), (3, 64, 6, 6)]:
                fused, plain = _gated_pair(True, False, host, channels=shape[1])
                with gate_kernel.disabled():  # the CPU kernel takes precedence where it applies
                    differences = _train_step_differences(fused, plain, shape, torch.float32)
                assert max(differences.values()) <= 1e-5, (host, shape, differences)
    finally:
        use_compiled_gates(False)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])  # one per gate form (+1 dynamic recompile)


@pytest.mark.slow
def test_whole_model_compile_traces_the_gates_and_matches_eager_training():
    """nam.compile on a classifier compiles the whole gated model: its fused gates are traced with
    it (no graph break) and a training step gives the eager model's outputs, gradients and statistics."""
    from torch._dynamo.utils import counters

    from nam_prune.models import ModelSpec, build_model
    from nam_prune.surgery import NAMConfig, insert_nam

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = insert_nam(build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=8)), NAMConfig())
    eager = copy.deepcopy(model)
    x, target = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    outputs = [m(x) for m in (torch.compile(model), eager)]
    for output in outputs:
        nn.functional.cross_entropy(output, target).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.allclose(*outputs, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-5, atol=1e-6), name


def test_affine_fit_is_the_least_squares_line_over_the_gates_inputs():
    """strip_gates folds ``e u + f`` into the host BN: the least-squares line over u ~ N(running stats)."""
    from nam_prune.gates import affine_fit

    g = torch.Generator().manual_seed(5)
    gate = NAMChannelGate(6, closing=True).double()
    with torch.no_grad():
        gate.bn.weight.copy_(torch.rand(6, generator=g) * 2)
        gate.bn.bias.copy_(torch.rand(6, generator=g) * 2 - 1)
        gate.bn.running_mean.copy_(torch.randn(6, generator=g))
        gate.bn.running_var.copy_(torch.rand(6, generator=g) * 4 + 0.01)
    gate.eval()
    u = torch.randn(400_000, 6, 1, 1, generator=g, dtype=torch.float64)
    u = u * gate.bn.running_var.sqrt().view(1, -1, 1, 1) + gate.bn.running_mean.view(1, -1, 1, 1)
    with torch.no_grad():
        out = gate(u)
    slope, intercept = affine_fit(gate)
    for c in range(6):
        design = torch.stack([u[:, c].flatten(), torch.ones(len(u), dtype=torch.float64)], 1)
        sampled = torch.linalg.lstsq(design, out[:, c].flatten()[:, None]).solution.flatten()
        torch.testing.assert_close(torch.stack([slope[c], intercept[c]]), sampled, atol=5e-3, rtol=0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("spatial", [False, True])
def test_opening_blends_the_gated_output_into_the_hosts(train, spatial):
    """``opening`` 0 is the gated layer, 1 the host alone (what stripping leaves), and linear between."""
    from nam_prune.gates import set_gate_opening

    torch.manual_seed(0)
    layer = NAMGated(nn.BatchNorm2d(8), NAMChannelGate(8, closing=True), NAMSpatialGate(5, 5) if spatial else None)
    with torch.no_grad():
        layer.channel.bn.weight.uniform_(0, 1)
    x = torch.randn(4, 8, 5, 5)
    outputs = {}
    for opening in (0.0, 0.25, 1.0):
        set_gate_opening(layer, opening)
        probe = copy.deepcopy(layer).train(train)  # each forward from the same statistics
        outputs[opening] = probe(x)
    hosted = copy.deepcopy(layer.host).train(train)(x)
    assert torch.equal(outputs[1.0], hosted)
    assert not torch.allclose(outputs[0.0], hosted, atol=1e-2)
    torch.testing.assert_close(outputs[0.25], 0.75 * outputs[0.0] + 0.25 * hosted)
