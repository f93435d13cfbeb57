"""The digits teacher shipped inside the package, so a first ``fewstep demo`` does not spend 15 minutes building it.

``SHIPPED_DIR`` holds one default build (``DigitsTeacherConfig()``) as a ``StableDiffusionPipeline`` folder whose
weights are diffusers' fp16 variant files (``unet/diffusion_pytorch_model.fp16.safetensors``, …), about 10 MB
in all, beside ``fewstep_teacher.json`` (the config it was built from, where and how long) and
``fewstep_yardstick.json`` (its rows on the yardstick, measured after the fp16 round trip). The folder loads as it
is (``StableDiffusionPipeline.from_pretrained(SHIPPED_DIR, variant="fp16")``); :func:`unpack_teacher` writes the
fp32 folder that the cache, the trainer and the yardstick use.

``digits_teacher`` unpacks it whenever the requested config is the one it was built from; any other config, and
``fewstep teacher digits --force``, trains a teacher from its config as before. Maintainers refresh the shipped
files after a change to the build with ``python -m fewstep.digits.shipped pack BUILT_TEACHER_DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "shipped_teacher"
WEIGHT_FILES = {  # component → weight file name without extension
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
YARDSTICK_FILE = "fewstep_yardstick.json"


def shipped_record() -> dict | None:
    """The shipped teacher's ``fewstep_teacher.json`` (None when the package has no shipped teacher)."""
    from .teacher import TEACHER_CONFIG_FILE

    path = SHIPPED_DIR / TEACHER_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ships(config) -> bool:
    """Whether the shipped teacher was built from ``config`` with the current build procedure."""
    from ..training.cache import config_hash
    from .teacher import VERSION

    record = shipped_record()
    return record is not None and record["version"] == VERSION and record["config_hash"] == config_hash(config)


def _weight_paths(directory: Path, variant: str | None) -> dict[str, Path]:
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return {part: directory / part / f"{name}{suffix}" for part, name in WEIGHT_FILES.items()}


def _convert(source: Path, target: Path, dtype) -> None:
    """Copy a safetensors file with its floating-point tensors cast to ``dtype`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)


def _copy_except(source: Path, target: Path, skip: set[Path]) -> None:
    from ..training.cache import MANIFEST

    for path in sorted(source.rglob("*")):
        if path.is_file() and path not in skip and path.name != MANIFEST:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def unpack_teacher(directory: str | Path) -> Path:
    """Write the shipped teacher into ``directory`` as an fp32 pipeline folder, as a build would have left it."""
    import torch

    directory = Path(directory)
    if shipped_record() is None:
        raise FileNotFoundError(f"this fewstep has no shipped digits teacher in {SHIPPED_DIR}")
    fp16 = _weight_paths(SHIPPED_DIR, "fp16")
    _copy_except(SHIPPED_DIR, directory, skip=set(fp16.values()))
    for part, path in _weight_paths(directory, None).items():
        _convert(fp16[part], path, torch.float32)
    return directory


def pack_teacher(built: str | Path, out: str | Path = SHIPPED_DIR) -> Path:
    """Write a built teacher folder as the shipped one: its weights in fp16, everything else as it is."""
    import torch

    from .teacher import TEACHER_CONFIG_FILE

    built, out = Path(built), Path(out)
    weights = _weight_paths(built, None)
    missing = [str(p) for p in weights.values() if not p.is_file()]
    if missing or not (built / TEACHER_CONFIG_FILE).is_file():
        raise SystemExit(f"{built} is not a built digits teacher folder (missing {', '.join(missing) or 'its record'})")
    if out.exists():
        shutil.rmtree(out)
    _copy_except(built, out, skip=set(weights.values()))
    for part, path in _weight_paths(out, "fp16").items():
        _convert(weights[part], path, torch.float16)
    return out


def measure_teacher(
    n: int = 2000, seeds: tuple[int, ...] = (0, 1, 2), rows: tuple[str, ...] = ("real", "teacher_50", "teacher_4", "teacher_1")
) -> dict:
    """The shipped teacher's yardstick rows (as unpacked, fp32) at n images per seed and the demo's CFG."""
    import tempfile
    import time

    import torch

    from ..commands.demo import DigitsDemoSettings
    from .yardstick import evaluate, mean_sd

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
        (fd_mean, fd_sd), (acc_mean, acc_sd) = mean_sd(v["fd"] for v in values), mean_sd(v["acc"] for v in values)
        summary[row] = {"fd_mean": fd_mean, "fd_sd": fd_sd, "acc_mean": acc_mean, "acc_sd": acc_sd, "per_seed": values}
    return {
        "n": n, "seeds": list(seeds), "guidance_scale": guidance_scale, "rows": summary,
        "command": f"python -m fewstep.digits.shipped measure --n {n} --seeds {' '.join(map(str, seeds))}",
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
        print(f"wrote {out} ({size / 1e6:.1f} MB); now run `python -m fewstep.digits.shipped measure`")
    else:
        record = measure_teacher(args.n, tuple(args.seeds))
        (SHIPPED_DIR / YARDSTICK_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for row, s in record["rows"].items():
            print(f"{row:12} FD {s['fd_mean']:.2f} ± {s['fd_sd']:.2f}   acc {s['acc_mean']:.4f} ± {s['acc_sd']:.4f}")
        print(f"wrote {SHIPPED_DIR / YARDSTICK_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
