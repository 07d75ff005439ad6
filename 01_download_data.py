#!/usr/bin/env python3
"""Get the benchmark CTs and write ct_data/manifest.csv.

Datasets (see docs/DATA.md for licences, the selection rule and the label mapping):
  msd-l2r   download MSD Task09_Spleen + Learn2Reg AbdomenCTCT, verify, extract, and select
            ceil(N/2) + floor(N/2) labelled cases, evenly spaced over the sorted case numbers
  offline   generate synthetic abdominal CT phantoms with ground-truth labels (no network)
  auto      msd-l2r when both servers answer a quick probe, otherwise offline (with a banner)
  none      only the --from-dir cases

Downloads resume after an interruption (HTTP Range), retry with backoff, are checked against
their checksum and renamed into place only when complete; a second run verifies and skips.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from common.core.paths import CT_DATA_DIR
from common.data.cases import ABDOMENCTCT, DEFAULT_EXCLUDE, MSD_SPLEEN, DataError, prepare_msd_l2r, \
    prepare_offline, scan_dir, write_manifest
from common.data.download import DownloadError, reachable_all

PROBE_TIMEOUT_S = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("auto", "msd-l2r", "offline", "none"), default="auto",
                   help="which cases to prepare (default: auto)")
    p.add_argument("--n-cases", type=int, default=None, metavar="N",
                   help="cases to select: msd-l2r default 20 (10 + 10); offline default 6 phantoms")
    p.add_argument("--from-dir", action="append", default=[], metavar="DIR", type=Path,
                   help="also add every *.nii/*.nii.gz CT in DIR (ground truth from DIR/labels/<same name>); "
                        "repeatable; e.g. ../shared/data")
    p.add_argument("--exclude", default=",".join(DEFAULT_EXCLUDE), metavar="PATTERNS",
                   help="comma-separated name patterns that --from-dir skips, case-insensitive "
                        "(default: %(default)s; '' keeps every file)")
    p.add_argument("--out", type=Path, default=CT_DATA_DIR, metavar="DIR",
                   help="data folder; the manifest is DIR/manifest.csv (default: ct_data/)")
    p.add_argument("--msd-url", default=MSD_SPLEEN.url, metavar="URL", help="MSD Task09_Spleen.tar (mirror, proxy)")
    p.add_argument("--l2r-url", default=ABDOMENCTCT.url, metavar="URL", help="Learn2Reg AbdomenCTCT.zip")
    p.add_argument("--msd-md5", default=MSD_SPLEEN.md5, metavar="HASH", help="expected md5 of the MSD tar")
    p.add_argument("--l2r-sha256", default=None, metavar="HASH",
                   help="expected sha256 of AbdomenCTCT.zip (default: the one recorded at the first download)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="offline phantoms: added to every phantom's seed")
    p.add_argument("--retries", type=int, default=5, metavar="N",
                   help="download retries after the first try (default 5)")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S", help="first retry wait in s, doubled each time")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="connect/read timeout in s (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.n_cases is not None and args.n_cases < 1:
        p.error("--n-cases must be at least 1")
    return args


def banner(lines: list[str]) -> str:
    width = max(len(s) for s in lines) + 4
    bar = "#" * width
    return "\n".join([bar, *(f"# {s.ljust(width - 4)} #" for s in lines), bar])


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    out = args.out.absolute()
    mode, note = args.dataset, ""
    if mode == "auto":
        down = [u for u, ok in reachable_all([args.msd_url, args.l2r_url], PROBE_TIMEOUT_S).items() if not ok]
        if down:
            mode = "offline"
            note = f"network unreachable ({', '.join(urlsplit(u).netloc for u in down)})"
            print(banner([
                "OFFLINE FALLBACK: " + note,
                "Using synthetic CT phantoms instead of MSD Spleen + AbdomenCTCT.",
                "They test speed and parity only; they are NOT clinical data.",
            ]), flush=True)
        else:
            mode = "msd-l2r"

    cases = []
    if mode == "msd-l2r":
        cases += prepare_msd_l2r(out, args.n_cases or 20, msd_url=args.msd_url, l2r_url=args.l2r_url,
                                 msd_md5=args.msd_md5 or None, l2r_sha256=args.l2r_sha256,
                                 retries=args.retries, backoff=args.backoff,
                                 timeout=(min(args.timeout, 10.0), args.timeout), progress=not args.no_progress)
    elif mode == "offline":
        cases += prepare_offline(out, args.n_cases, seed=args.seed)
    exclude = tuple(p.strip() for p in args.exclude.split(",") if p.strip())
    for folder in args.from_dir:
        found = scan_dir(folder, exclude)
        print(f"--from-dir {folder}: {len(found)} case(s)")
        cases += found
    if not cases:
        raise DataError("no cases: use --dataset or --from-dir")

    info = {"dataset": mode, "requested": args.dataset, "note": note, "n_cases": len(cases),
            "from_dir": [os.path.abspath(d) for d in args.from_dir],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest = write_manifest(cases, out / "manifest.csv", info)
    for c in cases:
        print(f"  {c.case_id:<24} {c.source:<16} {'x'.join(map(str, c.shape)):>12}  "
              f"{'x'.join(f'{s:.2f}' for s in c.spacing):>15} mm  {c.orientation}  "
              f"{'label' if c.label else 'no label'}")
    print(f"wrote {manifest} ({len(cases)} cases, dataset {mode}) in {time.monotonic() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (DownloadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted (a rerun resumes the download)", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
