"""The CUDA path (``device: auto`` picks it where a GPU is): run with ``python -m pytest -m cuda``.

Each test skips without a GPU, so the default run and CI (CPU only) list them as skipped.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import QUICKSTART, ROOT, TINY, cli
from test_gates import ReferenceChannelAtt, _randomize_bn

import nam_prune
from nam_prune.gates import NAMChannelGate
from nam_prune.recipe import load_recipe
from nam_prune.sparsity import apply_sparsity_penalty

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


@pytest.mark.parametrize("train", [True, False])
def test_channel_gate_matches_the_reference_on_cuda(train):
    """The gate on the GPU against the reference ``Channel_Att`` on the GPU: outputs and gradients."""
    shape, generator = (8, 16, 7, 7), torch.Generator().manual_seed(0)
    ours = NAMChannelGate(shape[1]).double()
    _randomize_bn(ours.bn.weight, ours.bn.bias, generator)
    reference = ReferenceChannelAtt(shape[1]).double()
    reference.load_state_dict({k.replace("bn.", "bn2."): v for k, v in ours.state_dict().items()})
    ours, reference = ours.cuda().train(train), reference.cuda().train(train)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).cuda()
    x_ours, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_reference = ours(x_ours), reference(x_reference)
    upstream = torch.randn_like(out_reference)
    (out_ours * upstream).sum().backward()
    (out_reference * upstream).sum().backward()
    torch.testing.assert_close(out_ours, out_reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_reference.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bn.weight.grad, reference.bn2.weight.grad, atol=1e-6, rtol=0)


def test_quickstart_runs_on_cuda_and_reloads_on_the_cpu(tmp_path, fashion_root):
    """The quickstart at its smallest size with ``device: cuda``; the saved model runs on the CPU."""
    recipe = load_recipe(QUICKSTART, [*TINY, "device=cuda", f"output={tmp_path / 'run'}"])
    result = nam_prune.run(recipe)
    assert result.results["device"].startswith("cuda")
    assert result.results["after"]["macs"] <= 0.5 * result.results["before"]["macs"]
    assert result.results["after"]["accuracy"] > 0.4  # 10 classes: chance is 0.1
    reloaded = nam_prune.load(result.folder / "model.pt")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model.eval().cpu()(x), atol=1e-5, rtol=1e-5)


def test_one_process_ddp_step_on_nccl(tiny_nam_resnet, tmp_path):
    """A gated model under DistributedDataParallel on an nccl group: the penalty reaches every
    gate through the wrapper and one SGD step moves each gamma by -lr * p * sign(gamma)."""
    lr, penalty = 0.5, 0.01
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_nam_resnet.cuda()
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[0])
        gates = [m for m in model.modules() if isinstance(m, NAMChannelGate)]
        with torch.no_grad():
            for gate in gates:
                gate.gamma.copy_(torch.linspace(-1, 1, gate.gamma.numel()))
        before = [g.gamma.detach().clone() for g in gates]
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=lr)
        (wrapped(torch.randn(4, 1, 28, 28, device="cuda")) * 0).sum().backward()
        apply_sparsity_penalty(wrapped, penalty)
        optimizer.step()
    finally:
        dist.destroy_process_group()
    for gate, old in zip(gates, before):
        torch.testing.assert_close(gate.gamma.detach() - old, -lr * penalty * torch.sign(old))


def test_a_yolo_recipe_trains_a_step_on_cuda(tmp_path):
    """A detector through ultralytics' trainer on the GPU: one epoch of each stage on the demo set."""
    pytest.importorskip("ultralytics")
    tiny = ["device=cuda", "yolo.imgsz=64", "yolo.report_imgsz=64", "report.latency_runs=1", "report.warmup=0",
            "sparsity.epochs=1", "finetune.epochs=1", "report.baseline=false", f"output={tmp_path / 'run'}"]
    done = cli("run", str(ROOT / "recipes" / "yolov8n_backbone_neck.yaml"), *tiny, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["device"].startswith("cuda")
    assert results["after"]["params"] < results["before"]["params"]
