"""`fastmask` command line: `fastmask info`, `fastmask demo`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastmask", description="Fused binary masks over pretrained transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="what is built, and the backend each op uses per device")
    info_parser.add_argument("--json", action="store_true", help="machine-readable output")
    from . import demo

    demo_parser = sub.add_parser("demo", help="learn a sparse mask over a packaged pretrained encoder")
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)

    if args.command == "info":
        from ._info import format_info, info

        report = info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))
        return 0
    if args.command == "demo":
        return demo.run_from_args(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
