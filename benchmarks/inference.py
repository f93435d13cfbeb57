"""``fewstep bench inference``: few-step pipeline latency at the real SD1.5 architecture (random weights).

Measured in one run, on one set of modules:

* the pipeline's parts: tokenizer + text encoder, one student UNet call (LoRA on), one teacher CFG UNet call
  (batch 2, LoRA off), VAE decode;
* fewstep's pipeline at 1 step, 4 steps, and 4 steps + Distillation++ on the first step;
* the teacher: diffusers' StableDiffusionPipeline, DDIM, 50 steps, CFG 7.5;
* the 1-step pipeline with diffusers' ``AutoencoderTiny`` (TAESD's architecture) as its VAE: the decoder that
  real-time one-step front ends use.

``one_step_overhead`` = pipeline(1 step) / (text encoder + 1 UNet call + VAE decode) − 1: what the pipeline adds
around the networks. ``speedup_vs_teacher_50`` = teacher(50 steps, CFG) / pipeline(1 step), both decoding with SD's
VAE; ``speedup_vs_teacher_50_tiny_vae`` is the same with the student decoding with the tiny one. Repeats are interleaved
(one of each per round) and the minimum is kept: on a shared machine other load only ever adds time.
The student is the base UNet with a DMD2-sized LoRA (rank 64, alpha 8) loaded, unfused, so that Distillation++
can disable it; its extra cost is counted in the student's time.
"""

from __future__ import annotations

import argparse
import time

HELP = "few-step pipeline latency vs its networks and vs the 50-step CFG teacher (SD1.5 architecture)"
PROMPT = "a photo of a cat riding a horse on the beach"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=256, help="image size (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the minimum is kept (default %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=50, help="teacher DDIM steps (default %(default)s)")
    parser.add_argument(
        "--teacher-timed-steps",
        type=int,
        help="time the teacher at this many steps and extrapolate to --teacher-steps with the measured CFG UNet "
        "call (default: time all of them)",
    )
    parser.add_argument("--teacher-guidance-scale", type=float, default=7.5, help="teacher CFG (default %(default)s)")
    parser.add_argument("--distillpp", type=float, default=0.05, help="Distillation++ λ (default %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda, else float32")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _check(args: argparse.Namespace) -> None:
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.teacher_steps < 1:
        raise ValueError(f"--teacher-steps must be ≥ 1, got {args.teacher_steps}")
    timed = args.teacher_timed_steps
    if timed is not None and not 1 <= timed <= args.teacher_steps:
        raise ValueError(f"--teacher-timed-steps must be in [1, {args.teacher_steps}], got {timed}")


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..cli import resolve_device

    _check(args)
    device = torch.device(resolve_device(args.device))  # before anything is built
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    timed_steps = args.teacher_timed_steps or args.teacher_steps

    print(f"fewstep bench inference: building SD1.5 (random weights) on {device} {str(dtype).removeprefix('torch.')}")
    teacher, student, student_tiny_vae = _build_pipelines(device, dtype)
    parts = _network_calls(student, student_tiny_vae.vae, args.resolution, device, dtype)
    pipelines = {
        "pipeline_1_step": _pipeline_call(student, args, 1),
        "pipeline_4_steps": _pipeline_call(student, args, 4),
        "pipeline_4_steps_distillpp_1": _pipeline_call(student, args, 4, args.distillpp),
        "pipeline_1_step_tiny_vae": _pipeline_call(student_tiny_vae, args, 1),
    }
    best: dict[str, float] = {}
    with torch.no_grad():
        print("fewstep bench inference: warm-up")
        for fn in parts.values():
            fn()
        for round_index in range(args.repeats):
            print(f"fewstep bench inference: round {round_index + 1}/{args.repeats}")
            for name, fn in {**parts, **pipelines}.items():
                seconds = _timed(fn, device)
                best[name] = min(seconds, best.get(name, float("inf")))
        print(f"fewstep bench inference: teacher, {timed_steps} of {args.teacher_steps} DDIM steps with CFG")
        teacher_timed = _timed(lambda: _teacher_call(teacher, student.unet, args, timed_steps), device)
    return _result(args, device, dtype, best, teacher_timed, timed_steps)


def _build_pipelines(device, dtype) -> tuple:
    """The teacher (diffusers' pipeline), the student on the same modules, and the student with a tiny VAE.

    The student is the teacher's UNet with a DMD2-sized LoRA (rank 64, alpha 8) on, so that the teacher's own calls
    run with it disabled.
    """
    import torch
    from diffusers import AutoencoderTiny
    from peft import LoraConfig

    from ..pipelines.fewstep_sd import FewStepSDPipeline
    from ..training.loop.networks import LORA_TARGET_MODULES
    from .sd15 import build_random_sd15_pipeline

    teacher = build_random_sd15_pipeline()
    teacher.unet.add_adapter(
        LoraConfig(r=64, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False), adapter_name="generator"
    )
    if dtype != torch.float32:  # (a no-op cast to float32 only makes diffusers warn)
        teacher.to(dtype=dtype)
    teacher.to(device)
    student = FewStepSDPipeline(**teacher.components, requires_safety_checker=False)
    tiny_vae = AutoencoderTiny().eval().to(device)  # TAESD's architecture, random weights
    if dtype != torch.float32:
        tiny_vae.to(dtype=dtype)
    student_tiny_vae = FewStepSDPipeline(**{**teacher.components, "vae": tiny_vae}, requires_safety_checker=False)
    for pipe in (teacher, student, student_tiny_vae):
        pipe.set_progress_bar_config(disable=True)
    return teacher, student, student_tiny_vae


def _network_calls(student, tiny_vae, resolution: int, device, dtype) -> dict:
    """The pipeline's parts, one call each, in the order they feed each other (text → UNet → decode)."""
    import torch

    from ..core.schedule import NoiseSchedule
    from ..pipelines.common import adapters_disabled

    unet, vae, tokenizer, text_encoder = student.unet, student.vae, student.tokenizer, student.text_encoder
    schedule = NoiseSchedule.from_config(dict(student.scheduler.config))
    latent = resolution // student.vae_scale_factor
    noise = torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    context = {}

    def encode(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)  # fmt: skip
        return text_encoder(ids)[0]

    def text_encoder_1():
        context["cond"] = encode([PROMPT])

    def text_encoder_cfg():
        context["cfg"] = encode(["", PROMPT])

    def unet_student():
        eps = unet(noise, 999, encoder_hidden_states=context["cond"]).sample
        context["x0"] = schedule.to_x0(eps, noise, 999)

    def unet_teacher_cfg():
        with adapters_disabled(unet):
            unet(torch.cat([noise, noise]), 999, encoder_hidden_states=context["cfg"])

    def vae_decode():
        vae.decode(context["x0"] / vae.config.scaling_factor)

    def vae_decode_tiny():
        tiny_vae.decode(context["x0"] / tiny_vae.config.scaling_factor)

    return {
        "text_encoder": text_encoder_1,
        "text_encoder_cfg": text_encoder_cfg,
        "unet_student": unet_student,
        "unet_teacher_cfg": unet_teacher_cfg,
        "vae_decode": vae_decode,
        "vae_decode_tiny": vae_decode_tiny,
    }


def _pipeline_call(pipe, args: argparse.Namespace, steps: int, lam: float = 0.0):
    """One few-step image from ``pipe`` (Distillation++ with weight ``lam`` on its first step)."""
    import torch

    return lambda: pipe(
        PROMPT, height=args.resolution, width=args.resolution, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0), teacher_guidance=lam, teacher_guided_steps=1,
        teacher_guidance_scale=args.teacher_guidance_scale,
    )  # fmt: skip


def _teacher_call(teacher, unet, args: argparse.Namespace, steps: int) -> None:
    """One image from diffusers' pipeline: DDIM with CFG, the student's LoRA off."""
    import torch

    from ..pipelines.common import adapters_disabled

    with adapters_disabled(unet):
        teacher(
            PROMPT, height=args.resolution, width=args.resolution, num_inference_steps=steps,
            guidance_scale=args.teacher_guidance_scale, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip


def _timed(fn, device) -> float:
    """Seconds of ``fn()``, with the GPU's queued work finished before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _result(args, device, dtype, s: dict, teacher_timed: float, timed_steps: int) -> dict:
    import torch

    extrapolated = timed_steps < args.teacher_steps
    teacher = teacher_timed + (args.teacher_steps - timed_steps) * s["unet_teacher_cfg"]
    components = {
        "1_step": s["text_encoder"] + s["unet_student"] + s["vae_decode"],
        "4_steps": s["text_encoder"] + 4 * s["unet_student"] + s["vae_decode"],
        "4_steps_distillpp_1": s["text_encoder_cfg"] + 4 * s["unet_student"] + s["unet_teacher_cfg"] + s["vae_decode"],
        "1_step_tiny_vae": s["text_encoder"] + s["unet_student"] + s["vae_decode_tiny"],
    }
    pipeline = {
        "1_step": s["pipeline_1_step"],
        "4_steps": s["pipeline_4_steps"],
        "4_steps_distillpp_1": s["pipeline_4_steps_distillpp_1"],
        "1_step_tiny_vae": s["pipeline_1_step_tiny_vae"],
    }
    overhead = {key: pipeline[key] / components[key] - 1 for key in pipeline}
    speedup = {key: teacher / pipeline[key] for key in pipeline}
    denoise_speedup = s["unet_teacher_cfg"] * args.teacher_steps / s["unet_student"]
    # Amdahl: even a free student UNet leaves the text encoder and the VAE decode the teacher also pays for.
    speedup_bound = teacher / (s["text_encoder"] + s["vae_decode"])
    return {
        "one_step_overhead": overhead["1_step"],
        "speedup_vs_teacher_50": speedup["1_step"],
        "speedup_vs_teacher_50_tiny_vae": speedup["1_step_tiny_vae"],
        "overhead": overhead,
        "speedup_vs_teacher": speedup,
        "seconds": {
            **{name: value for name, value in s.items() if not name.startswith("pipeline")},
            "components": components,
            "pipeline": pipeline,
            "teacher": teacher,
            "teacher_timed": teacher_timed,
        },
        "denoising_speedup_1_step": denoise_speedup,
        "speedup_bound_same_vae": speedup_bound,
        "targets": {"one_step_overhead_max": 0.10, "speedup_vs_teacher_50_min": 50.0},
        "setup": {
            "architecture": "SD1.5 (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M), random weights",
            "resolution": args.resolution,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "repeats": args.repeats,
            "statistic": "minimum over interleaved rounds",
            "student": "base UNet + LoRA rank 64, alpha 8 (unfused)",
            "teacher": f"StableDiffusionPipeline, DDIM, {args.teacher_steps} steps, CFG {args.teacher_guidance_scale}",
            "teacher_steps": args.teacher_steps,
            "teacher_timed_steps": timed_steps,
            "teacher_extrapolated": extrapolated,
            "distillpp_lambda": args.distillpp,
        },
    }


def format_table(result: dict) -> str:
    s, setup = result["seconds"], result["setup"]
    teacher_steps = f"{setup['teacher_steps']} steps"
    lines = [
        f"fewstep bench inference: {setup['architecture']}",
        f"{setup['resolution']}×{setup['resolution']}, {setup['device']} {setup['dtype']}"
        + (f", {setup['threads']} thread(s)" if setup["threads"] else "")
        + f", {setup['statistic']} ({setup['repeats']}); student = {setup['student']}",
        "",
        f"{'':40}{'seconds':>10}{'networks':>11}{'overhead':>10}{'speedup':>9}",
        f"{'text encoder (1 prompt / CFG pair)':40}{s['text_encoder']:>10.3f}   {s['text_encoder_cfg']:.3f} (CFG)",
        f"{'UNet call, student (LoRA on)':40}{s['unet_student']:>10.3f}",
        f"{'UNet call, teacher CFG (batch 2)':40}{s['unet_teacher_cfg']:>10.3f}",
        f"{'VAE decode':40}{s['vae_decode']:>10.3f}",
        f"{'VAE decode, AutoencoderTiny':40}{s['vae_decode_tiny']:>10.3f}",
    ]
    rows = [("1_step", "student 1 step"), ("4_steps", "student 4 steps"),
            ("4_steps_distillpp_1", f"4 steps + Distillation++ (1 step, λ={setup['distillpp_lambda']})"),
            ("1_step_tiny_vae", "student 1 step, AutoencoderTiny decode")]  # fmt: skip
    for key, label in rows:
        lines.append(
            f"{label:40}{s['pipeline'][key]:>10.3f}{s['components'][key]:>11.3f}"
            f"{result['overhead'][key]:>+10.1%}{result['speedup_vs_teacher'][key]:>8.1f}×"
        )
    note = f" (timed {setup['teacher_timed_steps']}, extrapolated)" if setup["teacher_extrapolated"] else ""
    lines += [
        f"{'teacher ' + teacher_steps + ', CFG' + note:40}{s['teacher']:>10.3f}{'':21}{1.0:>8.1f}×",
        "",
        f"one_step_overhead = {result['one_step_overhead']:+.1%} (target ≤ +10%); "
        f"speedup_vs_teacher_50 = {result['speedup_vs_teacher_50']:.1f}× (target ≥ 50×; "
        f"{result['speedup_vs_teacher_50_tiny_vae']:.1f}× decoding with AutoencoderTiny)",
        f"denoising alone (UNet calls, 1 step vs {teacher_steps} with CFG): {result['denoising_speedup_1_step']:.1f}×; "
        f"end to end, the text encoder and the VAE decode, which both runs share, bound it at "
        f"{result['speedup_bound_same_vae']:.1f}× even with a free student UNet.",
    ]
    return "\n".join(lines)
