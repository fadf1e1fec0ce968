"""Command line for the datasets: ``download`` (where the Hugging Face Hub is reachable) and ``info``.

    python -m ivt_env.datasets download refl4 --root ~/data          # or refcocog, refadv, mix (= all three)
    python -m ivt_env.datasets info mix --root ~/data                # counts per split, dropped / repaired records
    python -m ivt_env.datasets info synthetic --split val --show 5   # also prints a few samples
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from . import DATASET_NAMES, DatasetError, dataset_splits, load_dataset
from .download import HubUnreachable, download


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ivt_env.datasets",
        description="Fetch or inspect the grounding datasets (RefCOCOg, Ref-L4, Ref-Adv-s, their mix, synthetic).",
        epilog="Layouts the loaders read are documented in ivt_env/datasets/README.md and each loader's docstring.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{download,info}")
    d = sub.add_parser(
        "download",
        help="download a dataset from the Hugging Face Hub into the loaders' layout",
        description="Download NAME (refcocog = lmms-lab/RefCOCOg parquet, refl4 = JierunChen/Ref-L4, "
        "refadv = dddraxxx/ref-adv-s, mix/all = the three) into ROOT. Needs huggingface_hub. Fails at once, "
        "saying what to fetch by hand, when the Hub cannot be reached (HF_HUB_OFFLINE=1 or no connection).",
    )
    d.add_argument("name", help="refcocog | refl4 | refadv | mix | all")
    d.add_argument("--root", default=os.environ.get("IVT_DATA"), help="data root (default: $IVT_DATA)")
    d.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for a connection to the Hub (default 4)")
    d.add_argument("--no-extract", action="store_true", help="keep Ref-L4's images.tar.gz packed")
    splits = "; ".join(f"{n}: {', '.join(dataset_splits(n))}" for n in DATASET_NAMES)
    i = sub.add_parser(
        "info",
        help="print sample counts per split and dropped / repaired record counts",
        description="Load NAME for each of its splits and print how many samples it has, and how many upstream "
        f"records were dropped (by reason) or repaired (clipped box, EXIF rotation, colour mode). Splits: {splits}.",
    )
    i.add_argument("name", help=" | ".join(DATASET_NAMES))
    i.add_argument("--root", default=None, help="data root (default: $IVT_DATA; unused for synthetic)")
    i.add_argument("--split", action="append",
                   help="split(s) to load (default: every split of NAME, e.g. refadv: train, val, test, all)")
    i.add_argument("--no-check-images", action="store_true", help="do not open image headers (faster, less checked)")
    i.add_argument("--show", type=int, default=0, help="also print the first N samples of each split")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _info(args) -> int:
    synthetic = args.name.lower().replace("_", "").replace("-", "").startswith("synthetic")
    kwargs = {} if synthetic else {"check_images": not args.no_check_images}
    report = {}
    try:
        default_splits = dataset_splits(args.name)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split in args.split or default_splits:
        try:
            ds = load_dataset(args.name, split, data_root=args.root, **kwargs)
        except DatasetError as e:
            report[split] = {"error": str(e)}
            continue
        entry = {"samples": len(ds), "dropped": dict(getattr(ds, "bad_counts", {}) or {}),
                 "repaired": dict(getattr(ds, "fixed_counts", {}) or {})}
        if getattr(ds, "bad_examples", None):  # the first records of each reason, with their files
            entry["dropped_examples"] = ds.bad_examples
        for attr in ("per_source", "shortfall"):
            if getattr(ds, attr, None):
                entry[attr] = getattr(ds, attr)
        if args.show:
            entry["examples"] = [
                {"id": s.sample_id, "expression": s.expression, "box": [round(v, 1) for v in s.gt_box],
                 "size": [s.width, s.height]}
                for s in (ds[k] for k in range(min(args.show, len(ds))))
            ]
        report[split] = entry
    if args.json:
        print(json.dumps({"dataset": args.name, "splits": report}, indent=2))
    else:
        for split, e in report.items():
            if "error" in e:
                print(f"{args.name}/{split}: ERROR {e['error']}")
                continue
            print(f"{args.name}/{split}: {e['samples']} samples; dropped {sum(e['dropped'].values())} "
                  f"{e['dropped'] or ''}; repaired {e['repaired'] or 'none'}")
            for reason, examples in e.get("dropped_examples", {}).items():
                print(f"  {reason}: " + "; ".join(examples))
            for k in ("per_source", "shortfall"):
                if k in e:
                    print(f"  {k}: {e[k]}")
            for ex in e.get("examples", []):
                print(f"  {ex['id']}: {ex['expression']!r} box={ex['box']} size={ex['size']}")
    return 1 if any("error" in e for e in report.values()) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ivt_env").setLevel(logging.INFO)  # our counts, not the HTTP client's chatter
    if args.command == "download":
        if not args.root:
            print("error: pass --root DIR (or set IVT_DATA)", file=sys.stderr)
            return 2
        try:
            for dest in download(args.name, args.root, timeout=args.timeout, extract=not args.no_extract):
                print(f"downloaded into {dest}")
        except HubUnreachable as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
