#!/usr/bin/env python3
"""03: TotalSegmentator itself (`--fast`, CPU) on every manifest case: the reference.

Calls `totalsegmentator(input, output, ml=True, fast=True, device="cpu")` as a user would, with
usage statistics off and torch capped at --threads. Each output is saved to
OUT/outputs/vanilla/<case_id>.nii.gz: the parity reference of every other implementation.
Writes OUT/vanilla_results.csv, OUT/vanilla_report.md and OUT/SUMMARY.md.
"""
from __future__ import annotations

import argparse
import sys

from common.harness.cli import add_benchmark_args, run_and_report
from common.harness.vanilla import vanilla_runner


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(parser)
    args = parser.parse_args(argv)
    return run_and_report(args, [vanilla_runner(args.threads)], "03 Vanilla TotalSegmentator benchmark",
                          "vanilla_report.md")


if __name__ == "__main__":
    sys.exit(main())
