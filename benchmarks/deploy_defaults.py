"""Which deploy defaults to ship: quickstart runs that differ only in ``prune`` settings, read side by side.

Each run folder is one (configuration, seed) of ``nam-prune run recipes/fashion_quickstart.yaml
seed=S model.weights=<seed S's dense.pt> sparsity.epochs=0 report.baseline=false [overrides]``, so the
configurations of a seed differ only in what they override; folders are named ``<config>-s<seed>``.
Prints per configuration the fine-tuned top-1 per seed, its mean, the paired difference to ``--reference``
(mean ± std over seeds) and the realised share of the MAC cut at batch 32 (eager torch,
frozen TorchScript, onnxruntime), measured here in one process.

    python benchmarks/deploy_defaults.py runs/old-s0 runs/r16-s0 ... --reference old [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from run_speedup import measure_run
from timing import command_line

RUNS_MADE_BY = (
    "nam-prune run recipes/fashion_quickstart.yaml seed=S model.weights=<full run of seed S>/dense.pt sparsity.epochs=0 "
    "report.baseline=false output=<config>-s<S> [the config's overrides], in the folder holding the run folders: every "
    "config of a seed prunes the same sparsity-trained model"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference", default="base")
    parser.add_argument("--runs", dest="repeats", type=int, default=40, help="timed passes at batch 1")
    parser.add_argument("--made-by", default=RUNS_MADE_BY, help="how the run folders were made (kept in the JSON)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for folder in args.runs:
        config, seed = re.fullmatch(r"(.+)-s(\d+)", folder.name).groups()
        results = json.loads((folder / "results.json").read_text())
        speed = measure_run(folder, args.repeats)
        rows.append({
            "config": config, "seed": int(seed), "prune": speed["recipe_prune"],
            **{f"{stage}_accuracy": results[stage]["accuracy"] for stage in ("before", "pruned", "recalibrated", "after")},
            "after_macs": results["after"]["macs"], "after_params": results["after"]["params"],
            "macs_speedup": speed["macs_speedup"], "realised": speed["realised"],
        })
    by_config: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in rows:
        by_config[row["config"]][row["seed"]] = row
    reference = by_config[args.reference]
    summary = {}
    for config, seeds in by_config.items():
        after = [seeds[s]["after_accuracy"] for s in sorted(seeds)]
        paired = [100 * (seeds[s]["after_accuracy"] - reference[s]["after_accuracy"]) for s in sorted(seeds) if s in reference]
        realised = {k: statistics.mean(seeds[s]["realised"][k] for s in seeds) for k in ("torch_bs32", "torchscript_bs32", "ort_bs32")}
        summary[config] = {
            "after_accuracy": after, "mean": statistics.mean(after),
            f"minus_{args.reference}_pt": paired,
            "paired_mean_pt": statistics.mean(paired), "paired_std_pt": statistics.stdev(paired) if len(paired) > 1 else 0.0,
            "realised_bs32_mean": realised,
        }
        print(f"{config:>8}: top-1 {' '.join(f'{100 * a:.2f}' for a in after)} (mean {100 * statistics.mean(after):.2f}); "
              f"vs {args.reference} {summary[config]['paired_mean_pt']:+.2f} ± {summary[config]['paired_std_pt']:.2f} pt; "
              "realised bs32 " + " ".join(f"{k.split('_')[0]} {v:.2f}" for k, v in realised.items()))
    if args.json:
        command = command_line("python benchmarks/deploy_defaults.py " + shlex.join(sys.argv[1:]))
        args.json.write_text(json.dumps({"command": command, "runs_made_by": args.made_by, "summary": summary, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
