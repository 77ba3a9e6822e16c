"""`fastmask` command line: `fastmask info`, `fastmask demo`, `fastmask run <experiment>`, `fastmask bench`.

Each experiment is a module of `fastmask.experiments` exposing `add_arguments(parser)` and
`run_from_args(args) -> int`; it is imported only when the parser is built, each in its own try, so a missing
optional dependency of one experiment never breaks the others (or `info`, `demo`, `bench`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import demo
from ._argtypes import NON_NEGATIVE_FLOAT, OUTPUT_DIR, POSITIVE_FLOAT, POSITIVE_INT, SEED, arg_type  # noqa: F401
from ._info import format_info, info
from .bench import cli as bench_cli

# experiment name -> (module, one-line help). Add a row here to add `fastmask run <name>`.
EXPERIMENTS = {
    "knowledge": ("fastmask.experiments.knowledge",
                 "knowledge-critical subnetworks of a causal LM (Bayazit et al. 2024)"),
    "topoprobe": ("fastmask.experiments.topoprobe",
                 "structural and tree-topological probes per layer (Li et al. 2023)"),
    "disentangle": ("fastmask.experiments.disentangle",
                   "one mask per factor to disentangle representations (Zhang et al. 2021)"),
    "nm": ("fastmask.experiments.nm",
           "learned N:M (2:4) sparsity masks vs magnitude and Wanda (MaskLLM, Fang et al. 2024)"),
}


def _experiment_module(name: str):
    module_name, _ = EXPERIMENTS[name]
    return importlib.import_module(module_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmask", description="Fused binary masks over pretrained transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="what is built, and the backend each op uses per device")
    info_parser.add_argument("--json", action="store_true", help="machine-readable output")

    demo_parser = sub.add_parser("demo", help="learn a sparse mask over a packaged pretrained encoder")
    demo.add_arguments(demo_parser)

    bench_parser = sub.add_parser("bench", help="benchmark suite: layer grid and GPT-2 steps; `bench report` for "
                                                "the README table")
    bench_cli.add_arguments(bench_parser)

    run_parser = sub.add_parser("run", help="run a research experiment (see `fastmask run --help`)")
    experiments = run_parser.add_subparsers(dest="experiment", required=True)
    for name, (module_name, help_text) in EXPERIMENTS.items():
        exp_parser = experiments.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
            exp_parser.set_defaults(_unavailable=f"experiment {name!r} is not available in this build ({error})")
            continue
        module.add_arguments(exp_parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "info":
        report = info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))
        return 0
    if args.command == "demo":
        return demo.run_from_args(args)
    if args.command == "bench":
        return bench_cli.run_from_args(args)
    if args.command == "run":
        if getattr(args, "_unavailable", None):
            parser.error(args._unavailable)
        # Here, not at the top: fastmask.experiments (and torch.distributed, which its runner loads) is imported
        # only by build_parser, one experiment at a time, so that `from fastmask import cli` stays light.
        from .experiments.runner import ConfigError

        try:
            return _experiment_module(args.experiment).run_from_args(args)
        except ConfigError as error:  # a bad flag or config file value: a usage error (exit 2), no traceback
            parser.error(f"run {args.experiment}: {error}")
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
