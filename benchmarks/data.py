"""``fewstep bench data``: how a run's memory and start-up time grow with its data, with the encoding cache.

For each dataset size (prompts, images) three ``fewstep train`` runs of 2 iterations are launched as their own
processes: *fresh* (an empty cache: everything is encoded), *second* (another run on the same data: the cache is
reused) and *resume* (``--resume`` of the first run). Each is measured from launch to exit (its peak RSS from the
kernel, ``wait4``) and its encoding throughput is read from what it prints. The teachers: the tiny SD1.5-shaped test
teacher (32-wide text encoder, 32 px), and SD1.5's real text encoder and VAE (random weights, a tiny UNet) at 512 px
for a smaller count.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = "peak RSS, encoding throughput and start-up time of training against dataset size (encoding cache)"
TINY_CASES = "1000x1000,10000x1000,100000x1000,10000x10000,200000x20000"
SD15_CASES = "500x8"
ENCODED = re.compile(r"fewstep: (prompts|images) cache .*?: .*?encoded ([\d,]+) \w+ in ([\d.]+) s")


def add_arguments(parser) -> None:
    parser.add_argument("--cases", default=TINY_CASES,
                        help=f"PROMPTSxIMAGES sizes on the tiny teacher (default {TINY_CASES})")  # fmt: skip
    parser.add_argument("--sd15-cases", default=SD15_CASES,
                        help=f"sizes on SD1.5's real text encoder and VAE, random weights, 512 px (default "
                             f"{SD15_CASES}; '' to skip)")  # fmt: skip
    parser.add_argument("--workdir", default=None, help="where teachers, data and runs go (default: a temporary one)")


def _cases(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in case.split("x")) for case in text.split(",") if case.strip()]


def _teacher(kind: str, folder: Path) -> Path:
    from ..training.teacher import tiny_models

    if kind == "tiny":
        return tiny_models.save_tiny_pipeline(tiny_models.build_tiny_sd15_pipeline(), folder)
    return tiny_models.save_tiny_pipeline(sd15_encoders_pipeline(), folder)


def sd15_encoders_pipeline():
    """SD1.5's text encoder and VAE at their real size (random weights) around a tiny UNet: what encoding costs."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from ..training.teacher.tiny_models import _tiny_scheduler, _tiny_unet, clip_text_config, \
        write_offline_clip_tokenizer  # fmt: skip
    from .sd15 import SD15_TEXT_ENCODER, SD15_VAE

    with tempfile.TemporaryDirectory() as directory:
        tokenizer = write_offline_clip_tokenizer(directory)
    torch.manual_seed(0)
    unet = _tiny_unet(cross_attention_dim=768, attention_head_dim=(2, 4))
    unet.register_to_config(sample_size=64)
    return StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE).eval(),
                                   text_encoder=CLIPTextModel(clip_text_config(tokenizer, **SD15_TEXT_ENCODER)).eval(),
                                   tokenizer=tokenizer, unet=unet, scheduler=_tiny_scheduler("epsilon"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip


def _data(folder: Path, prompts: int, images: int, size: int) -> tuple[Path, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("".join(f"a photo of thing number {i}, in colour {i % 97}\n" for i in range(prompts)))
    image_dir = folder / "images"
    image_dir.mkdir(exist_ok=True)
    for i in range(images):
        Image.new("RGB", (size + 8, size), ((37 * i) % 256, (11 * i) % 256, 120)).save(image_dir / f"{i}.png")
        (image_dir / f"{i}.txt").write_text(f"a picture of thing {i}")
    return prompt_file, image_dir


def _measure(argv: list[str], env: dict) -> dict:
    """One process from launch to exit: its seconds, its own peak RSS (``wait4``: ``resource`` would report the
    largest child so far) and the encoding it reports."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fewstep.cli", *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"fewstep {argv[0]} failed: {out.strip().splitlines()[-1:]}")
    encoded = {kind: (int(n.replace(",", "")), float(s)) for kind, n, s in ENCODED.findall(out)}
    throughput = {kind: round(n / s, 1) if s else None for kind, (n, s) in encoded.items()}
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "encoded": {kind: n for kind, (n, _) in encoded.items()}, "items_per_s": throughput}  # fmt: skip


def _case(teacher: Path, folder: Path, prompts: int, images: int, size: int, env: dict) -> dict:
    prompt_file, image_dir = _data(folder / "data", prompts, images, size)
    cache = folder / "cache"
    common = ["--teacher", str(teacher), "--prompts", str(prompt_file), "--images", str(image_dir), "--cache-dir",
              str(cache), "--max-steps", "2", "--gen-rank", "4", "--fake-rank", "4", "--checkpoint-every", "2",
              "--validate-every", "0", "--warmup-steps", "1", "--report-to", "none", "--max-bad-fraction", "0"]
    result = {"prompts": prompts, "images": images}
    result["fresh"] = _measure(["train", *common, "--output", str(folder / "run")], env)
    result["second"] = _measure(["train", *common, "--output", str(folder / "run2")], env)
    result["resume"] = _measure(["train", "--output", str(folder / "run"), "--resume", "--max-steps", "4"], env)
    result["cache_mb"] = round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 1)
    return result


def batch_costs(teacher: Path, folder: Path, batch_sizes=(1, 8, 32), prompts: int = 2_000, repeats: int = 20) -> list:
    """Milliseconds per training batch of text conditioning: read from the cache vs encoded on the fly (the text
    encoders kept loaded), in this process, on random rows."""
    import torch

    from ..training.data.sources import prompt_list_source
    from ..training.loop.encodings import CachedConditioning, OnTheFlyConditioning, prompt_encoder
    from ..training.data.encoding_cache import EncodingCache
    from ..training.teacher import loading as teachers

    pipe, family = teachers.load_teacher(str(teacher))
    resolution = teachers.default_resolution(pipe)
    texts = [f"a photo of thing number {i}, in colour {i % 97}" for i in range(prompts)]
    source = prompt_list_source(texts, "bench prompts")
    width = pipe.text_encoder.config.hidden_size
    cache = EncodingCache(folder / "batch-cache", {"bench": source.identity}, source, 2 * 77 * width, 32)
    cache.build(prompt_encoder(pipe, family, resolution), show_progress=False)
    ways = {"cache": CachedConditioning(cache.open(), family, resolution),
            "on-the-fly": OnTheFlyConditioning(pipe, family, resolution, texts)}  # fmt: skip
    rng = torch.Generator().manual_seed(0)
    rows = []
    for batch in batch_sizes:
        row = {"batch": batch}
        for name, conditioning in ways.items():
            conditioning.select(torch.randint(0, prompts, (batch,), generator=rng))  # warm-up
            started = time.perf_counter()
            for _ in range(repeats):
                conditioning.select(torch.randint(0, prompts, (batch,), generator=rng))
            row[name] = round(1000 * (time.perf_counter() - started) / repeats, 2)
        rows.append(row)
    return rows


def run(args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fewstep-bench-data-"))
    results = {"cases": []}
    for kind, cases, size in (("tiny", _cases(args.cases), 32), ("sd15-encoders", _cases(args.sd15_cases), 512)):
        if not cases:
            continue
        teacher = _teacher(kind, root / f"teacher-{kind}")
        for prompts, images in cases:
            print(f"bench data: {kind} teacher, {prompts:,} prompts, {images:,} images", flush=True)
            case = _case(teacher, root / f"{kind}-{prompts}x{images}", prompts, images, size, env)
            results["cases"].append({"teacher": kind, **case})
        print(f"bench data: {kind} teacher, text conditioning per batch: cache vs on the fly", flush=True)
        results.setdefault("text_per_batch_ms", {})[kind] = batch_costs(teacher, root / f"{kind}-batches")
    return results


def format_table(result: dict) -> str:
    header = (f"{'teacher':<14} {'prompts':>8} {'images':>7} {'cache MB':>9} | {'fresh s':>8} {'RSS GB':>7} "
              f"{'prompts/s':>9} {'images/s':>8} | {'second s':>8} {'RSS GB':>7} | {'resume s':>8} {'RSS GB':>7}")
    lines = [header, "-" * len(header)]
    for c in result["cases"]:
        fresh, second, resume = c["fresh"], c["second"], c["resume"]
        rate = lambda kind: f"{fresh['items_per_s'].get(kind) or 0:>9,.0f}"  # noqa: E731
        lines.append(f"{c['teacher']:<14} {c['prompts']:>8,} {c['images']:>7,} {c['cache_mb']:>9,.1f} | "
                     f"{fresh['seconds']:>8.1f} {fresh['peak_rss_gb']:>7.3f} {rate('prompts')} "
                     f"{fresh['items_per_s'].get('images') or 0:>8,.0f} | {second['seconds']:>8.1f} "
                     f"{second['peak_rss_gb']:>7.3f} | {resume['seconds']:>8.1f} {resume['peak_rss_gb']:>7.3f}")
    for kind, rows in result.get("text_per_batch_ms", {}).items():
        lines += ["", f"text conditioning per batch, {kind} teacher (ms): " + "; ".join(
            f"batch {r['batch']}: cache {r['cache']:.2f}, on the fly {r['on-the-fly']:.2f}" for r in rows)]
    return "\n".join(lines)
