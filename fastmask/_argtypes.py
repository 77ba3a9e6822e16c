"""Checked argparse ``type=`` converters of the command line (``fastmask.cli`` re-exports them): a bad flag value is
a usage error before any work starts. A leaf module, so that the commands' modules (``demo``) import it without
importing ``cli``, which imports them."""

from __future__ import annotations

import argparse
import math
import os


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
