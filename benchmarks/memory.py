"""``fewstep bench memory``: peak memory of one DMD2 iteration, fewstep's shared base vs the reference's three UNets.

One iteration = a generator update and a fake-score update (DM loss + fake-score denoising loss), at the real SD1.5
UNet architecture (random weights), latents 32×32 (256 px), batch 1. Each layout runs in its own subprocess (peak
RSS is per process, and the reference layout can exhaust the machine); an out-of-memory death is reported as such.

- ``shared``: ONE frozen UNet + LoRA adapters ``generator`` and ``fake_score`` (fewstep).
- ``reference``: the DMD2 authors' LoRA mode: a frozen teacher UNet (fp32, or bf16 with ``--reference-teacher-dtype
  bf16``), a fully trained fp32 fake-score UNet, and a generator UNet + LoRA.

SDXL's UNet does not fit three times in 24 GB, so for SDXL the command reports a clearly labelled count of
parameter, gradient and AdamW-state bytes (no activations) for both layouts instead of a measurement.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

HELP = "peak memory of one DMD2 iteration: shared base UNet vs the reference's three UNets"

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def add_arguments(parser) -> None:
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of every adapter (default: %(default)s)")
    parser.add_argument("--latent-size", type=int, default=32, help="latent side, 32 = 256 px (default: %(default)s)")
    parser.add_argument(
        "--reference-teacher-dtype", choices=["fp32", "bf16"], default="fp32",
        help="the reference layout's teacher precision (the authors use bf16; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--layouts", default="shared,reference", help="comma-separated layouts to measure")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per layout (default: %(default)s)")


# ------------------------------------------------------------------------------------------ one layout
class ThreeUNetNetworks:
    """The reference layout behind the same DMD2Networks interface: three separate UNets."""

    def __init__(self, teacher, fake, generator, schedule, uncond, guidance_scale):
        self.teacher, self.fake, self.generator_unet = teacher, fake, generator
        self.schedule, self.uncond, self.guidance_scale = schedule, uncond, guidance_scale

    def _x0(self, unet, x_t, t, cond):
        out = unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
        return self.schedule.to_x0(out.float(), x_t.float(), t)

    def generator(self, x_t, t, cond):
        return self._x0(self.generator_unet, x_t, t, cond)

    def real_score(self, x_t, t, cond):
        import torch

        from ..core.sampling import cfg

        both = self._x0(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.uncond, cond]))
        uncond, cond_x0 = both.chunk(2)
        return cfg(uncond, cond_x0, self.guidance_scale)

    def fake_score(self, x_t, t, cond):
        return self._x0(self.fake, x_t, t, cond)

    def discriminator(self, x_t, t, cond):
        raise NotImplementedError

    def generator_parameters(self):
        return [p for p in self.generator_unet.parameters() if p.requires_grad]

    def fake_score_parameters(self):
        return list(self.fake.parameters())


def measure_layout(layout: str, rank: int, latent_size: int, reference_teacher_dtype: str) -> dict:
    """Build one layout, run one DMD2 iteration (generator + fake-score update), return peak RSS and time."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..core.schedule import NoiseSchedule
    from ..training.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
    from ..training.networks import SharedUNetNetworks, TextConditioning, attach_adapters, lora_config
    from .sd15 import SD15_SCHEDULER, SD15_UNET

    torch.manual_seed(0)
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    cond = torch.randn(1, 77, 768)
    uncond = torch.randn(1, 77, 768)
    if layout == "shared":
        unet = UNet2DConditionModel(**SD15_UNET)
        attach_adapters(unet, rank, rank / 8, rank, rank / 8)
        networks = SharedUNetNetworks(unet, schedule, TextConditioning(uncond), 1.75)
        batch_cond = TextConditioning(cond)
        unet_count = 1
    elif layout == "reference":
        teacher = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
        if reference_teacher_dtype == "bf16":
            teacher.to(torch.bfloat16)
        fake = UNet2DConditionModel(**SD15_UNET)
        generator = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
        generator.add_adapter(lora_config(rank, rank / 8), adapter_name="generator")
        networks = ThreeUNetNetworks(teacher, fake, generator, schedule, uncond, 1.75)
        batch_cond = cond
        unet_count = 3
    else:
        raise ValueError(f"unknown layout {layout!r}; use shared or reference")
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    loop = DMD2Loop(
        networks, adamw(networks.generator_parameters()), adamw(networks.fake_score_parameters()),
        DMD2LoopConfig(dfake_gen_update_ratio=1),
    )  # fmt: skip
    trainable = sum(p.numel() for p in networks.generator_parameters() + networks.fake_score_parameters())
    start = time.perf_counter()
    metrics = loop.train_step(DMD2Batch(shape=(1, 4, latent_size, latent_size), cond=batch_cond))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {
        "layout": layout,
        "unets": unet_count,
        "peak_rss_gb": peak_kib * 1024 / 1e9,
        "seconds": seconds,
        "trainable_params": trainable,
        "finite": all(v == v for v in metrics.values()),
    }


def _run_subprocess(layout: str, args) -> dict:
    command = [
        sys.executable, "-m", "fewstep.benchmarks.memory", layout, str(args.rank), str(args.latent_size),
        args.reference_teacher_dtype,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"layout": layout, "error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        reason = "out of memory (killed)" if killed else (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"layout": layout, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ SDXL (counted)
def _lora_params(unet, rank: int) -> int:
    import torch

    from ..training.networks import LORA_TARGET_MODULES

    total = 0
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in LORA_TARGET_MODULES):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            total += rank * (module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels)
    return total


def sdxl_state_counts(rank: int) -> dict:
    """Parameter + gradient + AdamW-state bytes of both layouts for SDXL's UNet (counted on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    base = sum(p.numel() for p in unet.parameters())
    lora = _lora_params(unet, rank)
    trained = lambda n: 4 * n * 4  # fp32 param + grad + two Adam moments
    shared = 4 * base + 2 * trained(lora)
    reference = 2 * base + trained(base) + (4 * base + trained(lora))  # bf16 teacher, full fake, generator+LoRA
    return {
        "unet_params": base,
        "lora_params_per_adapter": lora,
        "shared_state_gb": shared / 1e9,
        "reference_state_gb": reference / 1e9,
        "ratio": shared / reference,
        "note": "counted, not measured: parameter, gradient and AdamW-state bytes, no activations",
    }


# ------------------------------------------------------------------------------------------ the command
def run(args) -> dict:
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    results = {}
    for layout in layouts:
        print(f"fewstep bench memory: measuring the {layout} layout in a subprocess ...", flush=True)
        results[layout] = _run_subprocess(layout, args)
    ratio = None
    if all("peak_rss_gb" in results.get(k, {}) for k in ("shared", "reference")):
        ratio = results["shared"]["peak_rss_gb"] / results["reference"]["peak_rss_gb"]
    return {
        "architecture": "SD1.5 UNet (random weights)",
        "latent": [1, 4, args.latent_size, args.latent_size],
        "rank": args.rank,
        "reference_teacher_dtype": args.reference_teacher_dtype,
        "layouts": results,
        "ratio": ratio,
        "target_ratio": 0.4,
        "sdxl_counted": sdxl_state_counts(args.rank),
        "machine": f"{os.cpu_count()} CPU cores",
    }


def format_table(result: dict) -> str:
    lines = [f"DMD2, one iteration (generator + fake-score update), {result['architecture']}, latent "
             f"{'×'.join(map(str, result['latent']))}, LoRA rank {result['rank']}", ""]  # fmt: skip
    lines.append(f"{'layout':<12}{'UNets':>6}{'peak RSS GB':>14}{'seconds':>10}{'trainable params':>18}")
    for name, row in result["layouts"].items():
        if "error" in row:
            lines.append(f"{name:<12}{'':>6}{row['error']:>42}")
        else:
            lines.append(
                f"{name:<12}{row['unets']:>6}{row['peak_rss_gb']:>14.2f}{row['seconds']:>10.1f}"
                f"{row['trainable_params']:>18,}"
            )
    if result["ratio"] is not None:
        lines.append(f"\nratio shared / reference: {result['ratio']:.3f} (target ≤ {result['target_ratio']})")
    sdxl = result["sdxl_counted"]
    lines.append(
        f"SDXL UNet ({sdxl['unet_params'] / 1e9:.2f} B params), {sdxl['note']}: shared {sdxl['shared_state_gb']:.1f} GB"
        f" vs reference {sdxl['reference_state_gb']:.1f} GB, ratio {sdxl['ratio']:.3f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    layout, rank, latent_size, teacher_dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(json.dumps(measure_layout(layout, rank, latent_size, teacher_dtype)))
