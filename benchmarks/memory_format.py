"""How much of TorchScript's lead over eager torch is the memory format? Dense ResNet-50 on the CPU.

Eager and frozen TorchScript, each contiguous (NCHW) and channels-last (NHWC), and the file ``export
--format torchscript`` writes (channels-last, large batches run in slices: ``export.BatchChunks``),
at 224x224, batch 1 and 32, timed in alternation (``timing.py``), in inference mode.

    python benchmarks/memory_format.py [--json docs/memory_format.json]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from timing import interleaved_ms, write_result

from nam_prune.export import frozen_torchscript
from nam_prune.models import ModelSpec, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = build_model(ModelSpec("resnet50", num_classes=1000)).eval()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    examples = {"bs1": torch.randn(1, 3, 224, 224), "bs32": torch.randn(32, 3, 224, 224)}
    names = ("eager NCHW", "eager NHWC", "TorchScript NCHW", "TorchScript NHWC", "TorchScript NHWC sliced")
    forms = {name: {} for name in names}
    for label, x in examples.items():
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        frozen_nchw = frozen_torchscript(model, x, channels_last=False, batch_chunks=False)
        frozen_nhwc = frozen_torchscript(model, x, batch_chunks=False)
        sliced = frozen_torchscript(model, x)  # what the export writes
        forms["eager NCHW"][f"ms_{label}"] = lambda x=x: model(x)
        forms["eager NHWC"][f"ms_{label}"] = lambda x=x_nhwc: nhwc(x)
        forms["TorchScript NCHW"][f"ms_{label}"] = lambda x=x, m=frozen_nchw: m(x)
        forms["TorchScript NHWC"][f"ms_{label}"] = lambda x=x, m=frozen_nhwc: m(x)  # converts its input itself
        forms["TorchScript NHWC sliced"][f"ms_{label}"] = lambda x=x, m=sliced: m(x)
    timed = interleaved_ms(list(forms.values()), {"bs1": 10, "bs32": 1}, args.rounds, warmup=2)
    rows = dict(zip(forms, timed))
    for name, ms in rows.items():
        print(f"{name:>17}: " + "  ".join(f"{column[3:]} {value:8.1f} ms" for column, value in ms.items()))
    if args.json:
        write_result(args.json, "memory_format.py", args, ms=rows)


if __name__ == "__main__":
    main()
