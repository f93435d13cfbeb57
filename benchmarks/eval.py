"""``fewstep bench eval``: what ``fewstep eval --prompts`` costs per image, at the real SD1.5 architecture (or the
tiny one), with metric models of DINOv2-base's and CLIP ViT-L/14's real architectures — all random weights, built
in memory (nothing is downloaded or saved).

It runs the library's evaluation (``training/evaluation``) on the rows ``fewstep eval`` makes for a 4-step DMD2
student: the teacher (DDIM, CFG 1.75, SD1.5's distillation scale), the student (a rank-64 LoRA, DMD2's rule), the
student + Distillation++ (the authors' setting) and its noise-only control. It reports each row's sampling seconds
per image (text encoding, UNet passes, VAE decoding), the metric models' seconds per image (DINOv2 and CLIP, both
passes) and the run's wall time. The metric values of random networks mean nothing; the timings are a real model's.
"""

from __future__ import annotations

import argparse
import time

HELP = "seconds per image of fewstep eval's rows and metric models (SD1.5 or tiny architecture, random weights)"
PROMPTS = ["a photo of a cat", "a red car on the street", "a dog on the beach", "a painting of a mountain at night",
           "a portrait of a woman", "a small house in the forest", "a bird in the sky", "a city street at night"]
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=518)  # fmt: skip
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu")  # fmt: skip
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)  # fmt: skip
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", choices=["sd15", "tiny"], default="sd15",
                        help="the teacher's architecture (default %(default)s)")
    parser.add_argument("--metric-models", choices=["real", "tiny"], default="real",
                        help="DINOv2-base and CLIP ViT-L/14 at their real size, or tiny ones (default %(default)s)")
    parser.add_argument("--resolution", type=int, help="image size (default: 512 for sd15, 32 for tiny)")
    parser.add_argument("--prompts", type=int, default=8, help=f"prompts, up to {len(PROMPTS)} (default %(default)s)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="images per prompt (default %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=50, help="teacher DDIM steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per UNet batch (default %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on cuda, else float32")


def _check(args: argparse.Namespace) -> None:
    for name in ("images_per_prompt", "teacher_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if not 1 <= args.prompts <= len(PROMPTS) or args.prompts * args.images_per_prompt < 2:
        raise ValueError(f"--prompts must be in [1, {len(PROMPTS)}] with at least 2 images in all, got {args.prompts}")


def random_scorer(size: str, device):
    """DINOv2 and CLIP of the real (``"real"``) or a tiny size, random weights, as the evaluation's Scorer."""
    import tempfile

    import torch
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from ..training.evaluation.metric_models import (CLIP_MEAN, CLIP_STD, DINOV2_INPUT_SIZE, IMAGENET_MEAN,
                                                     IMAGENET_STD, FeatureNetwork)  # fmt: skip
    from ..training.evaluation.scoring import Scorer
    from ..training.teacher.tiny_models import clip_text_config, write_offline_clip_tokenizer

    real = size == "real"
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = write_offline_clip_tokenizer(directory)
    torch.manual_seed(0)
    text = clip_text_config(tokenizer, **(CLIP_L14_TEXT if real else TINY_CLIP_TEXT))
    vision = CLIP_L14_VISION if real else TINY_CLIP_VISION
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=768 if real else 16))
    dino = Dinov2Model(Dinov2Config(**(DINOV2_BASE if real else TINY_DINOV2)))
    for model in (clip, dino):
        model.requires_grad_(False).eval().to(device)
    return Scorer(
        FeatureNetwork(f"random DINOv2 ({size})", "dinov2", dino, DINOV2_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD),
        FeatureNetwork(f"random CLIP ({size})", "clip", clip, vision["image_size"], CLIP_MEAN, CLIP_STD, tokenizer),
    )


def _pipeline(architecture: str, device, dtype):
    """The teacher with a DMD2-sized student LoRA (rank 64, alpha 8; rank 4 on the tiny one) as adapter "student"."""
    import torch
    from peft import LoraConfig

    from ..training.evaluation.rows import STUDENT_ADAPTER
    from ..training.loop.networks import LORA_TARGET_MODULES
    from ..training.teacher.tiny_models import build_tiny_sd15_pipeline
    from .sd15 import build_random_sd15_pipeline

    pipe = build_random_sd15_pipeline() if architecture == "sd15" else build_tiny_sd15_pipeline()
    rank, alpha = (64, 8) if architecture == "sd15" else (4, 2)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
    pipe.unet.add_adapter(config, adapter_name=STUDENT_ADAPTER)
    if dtype != torch.float32:  # (a no-op cast to float32 only makes diffusers warn)
        pipe.to(dtype=dtype)
    return pipe.to(device)


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..cli import resolve_device
    from ..training.evaluation.rows import DistillppSpec, SDModels, StudentRow, TeacherRow, distillpp_rows
    from ..training.evaluation.scoring import evaluate

    _check(args)
    device = torch.device(resolve_device(args.device))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    resolution = args.resolution or (512 if args.architecture == "sd15" else 32)
    print(f"fewstep bench eval: building {args.architecture} (random weights) and {args.metric_models} metric models")
    pipe, scorer = _pipeline(args.architecture, device, dtype), random_scorer(args.metric_models, device)
    student = StudentRow((999, 749, 499, 249))
    rows = [TeacherRow(args.teacher_steps, 1.75), student, *distillpp_rows([DistillppSpec()], student)]
    started = time.perf_counter()
    evaluation = evaluate(SDModels(pipe, "sd15", resolution), rows, PROMPTS[: args.prompts], scorer,
                          args.images_per_prompt, batch_size=args.batch_size)  # fmt: skip
    wall = time.perf_counter() - started
    images = torch.rand(args.batch_size, 3, resolution, resolution)
    scorer.embed(images)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = time.perf_counter()
    scorer.embed(images)
    metric_seconds = (time.perf_counter() - timed) / args.batch_size
    return {
        "seconds_per_image": {name: row["seconds_per_image"] for name, row in evaluation.result["rows"].items()},
        "titles": evaluation.result["titles"],
        "metric_models_seconds_per_image": metric_seconds,
        "wall_seconds": wall,
        "setup": {
            "architecture": args.architecture, "metric_models": args.metric_models, "resolution": resolution,
            "prompts": args.prompts, "images_per_prompt": args.images_per_prompt, "batch_size": args.batch_size,
            "teacher_steps": args.teacher_steps, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
    }  # fmt: skip


def format_table(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"fewstep bench eval: {setup['architecture']} teacher, {setup['metric_models']} metric models (random "
        f"weights), {setup['resolution']} px, {setup['device']} {setup['dtype']}, {setup['prompts']} prompts × "
        f"{setup['images_per_prompt']}, batch {setup['batch_size']}",
        f"{'row':<22}{'s/image':>10}  what",
    ]
    for name, seconds in result["seconds_per_image"].items():
        lines.append(f"{name:<22}{seconds:>10.3f}  {result['titles'][name]}")
    lines += [
        f"{'metric models':<22}{result['metric_models_seconds_per_image']:>10.3f}  DINOv2 + CLIP image passes",
        f"whole evaluation: {result['wall_seconds']:.1f} s",
    ]
    return "\n".join(lines)
