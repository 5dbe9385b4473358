"""``mmcache plan --profile OUT.json``'s command line (``llm_worker.planner.profile`` measures):
its arguments, the progress shown while it measures, and the profile written atomically."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from llm_worker.planner import profile
from llm_worker.planner.profile import QUICK, Grid, Size, measure
from mmcache.common.progress import Progress


def write(doc: dict, path: str | os.PathLike) -> None:
    """``doc`` as JSON, one top-level key a line (diffable), replacing ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + "\n}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated ints") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every entry must be >= 1")
    return values


def _sizes(text: str) -> tuple[Size, ...]:
    try:
        sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated WIDTHxHEIGHT sizes >= 1")
    return sizes


def _positive(text: str) -> int:
    value = _ints(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be one int >= 1")
    return value[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcache plan --profile", description=profile.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava", help="a built-in model name or a local model directory")
    parser.add_argument("--data-dir", default="./mmcache-data", help="where built-in models are built")
    parser.add_argument("--out", required=True, help="the profile (JSON) to write")
    parser.add_argument("--quick", action="store_true", help="a small grid (minutes for a CLIP-L/336 model on a CPU)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16, ... (default: the workers': float32 on the CPU)")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs per point, after one warm-up")
    parser.add_argument("--quiet", action="store_true",
                        help="progress as plain lines (a line per point and one every 10 s), no bar on a terminal")
    for f in dataclasses.fields(Grid):
        parser.add_argument("--" + f.name.replace("_", "-"), type=_sizes if f.name == "image_sizes" else _ints,
                            help=f"comma-separated{' WxH' if f.name == 'image_sizes' else ''} "
                                 f"(default {f.default}; --quick: {getattr(QUICK, f.name)})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:  # NOTE: before the minutes of measuring, not after
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            raise IsADirectoryError(f"{out} is a directory")
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        print(f"plan_profile: error: cannot write --out {out}: {e}", file=sys.stderr)
        return 2
    grid = {f.name: getattr(args, f.name) for f in dataclasses.fields(Grid) if getattr(args, f.name) is not None}
    shown: list[Progress] = []

    def progress(done: int, total: int, what: str) -> None:
        # NOTE: made once measuring starts, not before: the model's build shows its own progress,
        # and a bad argument should not print an empty count first.
        if not shown:
            shown.append(Progress("profile", total, unit="points", quiet=args.quiet))
        # NOTE: each point's figure on a line of its own (above the bar on a terminal)
        shown[0].note(f"{what} ({done}/{total})" if done else what)
        if done:
            shown[0].update(done - shown[0].done)
    try:
        try:
            doc = measure(args.model, args.data_dir, device=args.device, dtype=args.dtype, quick=args.quick,
                          repeats=args.repeats, progress=progress, **grid)
        finally:  # NOTE: the count's last line (or the bar's end) before any error, not after it
            for display in shown:
                display.close()
        write(doc, out)
    except (ValueError, OSError) as e:
        print(f"plan_profile: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
