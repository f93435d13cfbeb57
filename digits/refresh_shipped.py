"""Maintainers' tool: refresh the digits teacher shipped in the package (:mod:`.shipped`).

``python -m fewstep.digits.refresh_shipped pack BUILT_TEACHER_DIR`` writes a built teacher as the shipped fp16
folder; ``... measure`` records its yardstick rows (n = 2,000 × 3 seeds) in ``fewstep_yardstick.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .shipped import SHIPPED_DIR, YARDSTICK_FILE, pack_teacher, unpack_teacher


def measure_teacher(
    n: int = 2000, seeds: tuple[int, ...] = (0, 1, 2), rows: tuple[str, ...] = ("real", "teacher_50", "teacher_4", "teacher_1")
) -> dict:
    """The shipped teacher's yardstick rows (as unpacked, fp32) at n images per seed and the demo's CFG."""
    import tempfile
    import time

    import torch

    from .demo_settings import DigitsDemoSettings
    from .yardstick import MANIFOLD_KEYS, evaluate, mean_sd

    guidance_scale = DigitsDemoSettings.guidance_scale
    per_seed: dict[str, list[dict]] = {row: [] for row in rows}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = unpack_teacher(Path(tmp) / "teacher")
        for seed in seeds:
            result = evaluate(teacher, n=n, seed=seed, rows=list(rows), guidance_scale=guidance_scale)
            for row in rows:
                per_seed[row].append({"seed": seed, **result["rows"][row]})
                print(f"{row} seed {seed}: FD {result['rows'][row]['fd']:.2f}, acc {result['rows'][row]['acc']:.4f}")
    summary = {}
    for row, values in per_seed.items():
        summary[row] = {}
        for key in ("fd", "acc", *MANIFOLD_KEYS):
            summary[row][f"{key}_mean"], summary[row][f"{key}_sd"] = mean_sd(v[key] for v in values)
        summary[row]["per_seed"] = values
    return {
        "n": n, "seeds": list(seeds), "guidance_scale": guidance_scale, "rows": summary,
        "command": f"python -m fewstep.digits.refresh_shipped measure --n {n} --seeds {' '.join(map(str, seeds))}",
        "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refresh the digits teacher shipped in the package.")
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="write a built teacher folder (fp32) as the shipped one (fp16)")
    pack.add_argument("built", help="a folder written by `fewstep teacher digits --out DIR`")
    pack.add_argument("--out", default=str(SHIPPED_DIR), help="where (default: the package's shipped folder)")
    measure = sub.add_parser("measure", help=f"measure the shipped teacher on the yardstick into {YARDSTICK_FILE}")
    measure.add_argument("--n", type=int, default=2000, help="images per row and seed (default: %(default)s)")
    measure.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        out = pack_teacher(args.built, args.out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"wrote {out} ({size / 1e6:.1f} MB); now run `python -m fewstep.digits.refresh_shipped measure`")
    else:
        record = measure_teacher(args.n, tuple(args.seeds))
        (SHIPPED_DIR / YARDSTICK_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for row, s in record["rows"].items():
            print(
                f"{row:12} FD {s['fd_mean']:.2f} ± {s['fd_sd']:.2f}   acc {s['acc_mean']:.4f} ± {s['acc_sd']:.4f}   "
                f"recall {s['recall_mean']:.3f} ± {s['recall_sd']:.3f}   coverage {s['coverage_mean']:.3f} ± "
                f"{s['coverage_sd']:.3f}"
            )
        print(f"wrote {SHIPPED_DIR / YARDSTICK_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
