"""`fastmask` command line: `fastmask info`, `fastmask demo`, `fastmask run <experiment>`, `fastmask bench`.

Each experiment is a module of `fastmask.experiments` exposing `add_arguments(parser)` and
`run_from_args(args) -> int`; it is imported only when its command runs (or `--help` lists it), so a missing
optional dependency of one experiment never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

# experiment name -> (module, one-line help). Add a row here to add `fastmask run <name>`.
EXPERIMENTS = {
    "knowledge": ("fastmask.experiments.knowledge",
                 "knowledge-critical subnetworks of a causal LM (Bayazit et al. 2024)"),
    "topoprobe": ("fastmask.experiments.topoprobe",
                 "structural and tree-topological probes per layer (Li et al. 2023)"),
    "disentangle": ("fastmask.experiments.disentangle",
                   "one mask per factor to disentangle representations (Zhang et al. 2021)"),
}


def arg_type(convert, test, expected: str):
    """An argparse ``type=`` that converts a flag's text and checks it: a bad value is a usage error before any
    work starts, e.g. "argument --lr: expected a finite number > 0, got 'nan'"."""

    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


POSITIVE_INT = arg_type(int, lambda v: v >= 1, "an int >= 1")
SEED = arg_type(int, lambda v: 0 <= v <= 2**63 - 1, "an int in [0, 2**63 - 1]")
POSITIVE_FLOAT = arg_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE_FLOAT = arg_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
OUTPUT_DIR = arg_type(str, lambda v: bool(v) and not os.path.isfile(v), "a folder path (not an existing file)")


def _experiment_module(name: str):
    module_name, _ = EXPERIMENTS[name]
    return importlib.import_module(module_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmask", description="Fused binary masks over pretrained transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="what is built, and the backend each op uses per device")
    info_parser.add_argument("--json", action="store_true", help="machine-readable output")
    from . import demo

    demo_parser = sub.add_parser("demo", help="learn a sparse mask over a packaged pretrained encoder")
    demo.add_arguments(demo_parser)

    from .bench import cli as bench_cli

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
        from ._info import format_info, info

        report = info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))
        return 0
    if args.command == "demo":
        from . import demo

        return demo.run_from_args(args)
    if args.command == "bench":
        from .bench import cli as bench_cli

        return bench_cli.run_from_args(args)
    if args.command == "run":
        if getattr(args, "_unavailable", None):
            parser.error(args._unavailable)
        from .experiments.runner import ConfigError

        try:
            return _experiment_module(args.experiment).run_from_args(args)
        except ConfigError as error:  # a bad flag or config file value: a usage error (exit 2), no traceback
            parser.error(f"run {args.experiment}: {error}")
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
