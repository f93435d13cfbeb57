"""``fewstep bench memory``: peak memory and time of DMD2 iterations, fewstep's shared base vs the reference's layout.

One iteration = a generator update (DM loss + GAN generator loss) and a fake-score update (denoising loss + GAN
discriminator loss on real latents), batch 1, at the real SD1.5 or SDXL UNet architecture (random weights), in the
configuration a user on one GPU picks: base weights in bf16 under autocast, fp32 LoRA adapters, gradient
checkpointing (``--precision``/``--no-gradient-checkpointing`` change it). Each layout runs in its own subprocess
(peak memory is per process; the reference layout can exhaust the machine); an out-of-memory death is reported as such.

- ``shared``: ONE frozen UNet + LoRA adapters ``generator`` and ``fake_score`` + the GAN head (fewstep).
- ``reference``: the DMD2 authors' LoRA mode as they run it: a frozen teacher UNet in the run's precision, a fully
  trained fp32 fake-score UNet with the GAN head, and an fp32 generator UNet + LoRA.

``--device cuda`` measures ``torch.cuda.max_memory_allocated``; on the CPU the peak RSS. Time: the mean of
``--iterations`` iterations after one warm-up. SDXL's layouts are also counted (parameter, gradient and AdamW-state
bytes, no activations) where they cannot be run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HELP = "peak memory and time of DMD2 iterations: shared base UNet vs the reference's three UNets"

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
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}


def add_arguments(parser) -> None:
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15", help="UNet architecture (default: %(default)s)")
    parser.add_argument("--resolution", type=int, help="image size in px (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of every adapter (default: %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"],
        help="base UNet weights and autocast (LoRA and the reference's fake score stay fp32; default: bf16 on cuda, "
        "fp32 on cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
        help="measure without gradient checkpointing (default: on, as a 24 GB user runs SDXL)",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations after a warm-up (default: %(default)s)")
    parser.add_argument("--layouts", default="shared,reference", help="comma-separated layouts to measure")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per layout (default: %(default)s)")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS",
        help="also profile one more iteration per layout (torch.profiler) and print its top ROWS ops by self time; "
        "each network role's passes are labelled fewstep::generator, fewstep::real_score, ... (default: off)",
    )  # fmt: skip


def _settings(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or DEFAULT_RESOLUTION[args.family]
    if resolution < 64 or resolution % 64:
        raise ValueError(f"--resolution must be a positive multiple of 64, got {resolution}")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be ≥ 1, got {args.iterations}")
    return dict(
        family=args.family, rank=args.rank, resolution=resolution, device=device,
        precision=args.precision or ("bf16" if device.startswith("cuda") else "fp32"),
        gradient_checkpointing=args.gradient_checkpointing, iterations=args.iterations, profile=args.profile,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ one layout
class ThreeUNetNetworks:
    """The reference layout behind the same DMD2Networks interface: three separate UNets, GAN head on the fake one."""

    def __init__(self, teacher, fake, generator, schedule, uncond, guidance_scale, gan_head):
        self.teacher, self.fake, self.generator_unet = teacher, fake, generator
        self.schedule, self.uncond, self.guidance_scale, self.gan_head = schedule, uncond, guidance_scale, gan_head
        self._features = None
        fake.mid_block.register_forward_hook(lambda module, inputs, output: setattr(self, "_features", output))

    def _x0(self, unet, x_t, t, cond):
        out = unet(x_t.to(unet.dtype), t, **cond.to(x_t.device, unet.dtype).unet_kwargs()).sample
        return self.schedule.to_x0(out.float(), x_t.float(), t)

    def generator(self, x_t, t, cond):
        return self._x0(self.generator_unet, x_t, t, cond)

    def real_score(self, x_t, t, cond):
        import torch

        from ..core.sampling import cfg
        from ..training.networks import TextConditioning

        both = TextConditioning.cat([self.uncond.repeat_to(x_t.shape[0]), cond])
        uncond, cond_x0 = self._x0(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return cfg(uncond, cond_x0, self.guidance_scale)

    def fake_score(self, x_t, t, cond):
        return self._x0(self.fake, x_t, t, cond)

    def discriminator(self, x_t, t, cond):
        self._x0(self.fake, x_t, t, cond)  # the reference runs the whole fake UNet, then reads the mid block
        features, self._features = self._features, None
        return self.gan_head(features)

    def activate(self, network):
        pass  # three separate UNets: nothing to switch before a backward

    def generator_parameters(self):
        return [p for p in self.generator_unet.parameters() if p.requires_grad]

    def fake_score_parameters(self):
        return list(self.fake.parameters()) + list(self.gan_head.parameters())


def _conditioning(family: str, resolution: int, device):
    import torch

    from ..training.networks import TextConditioning

    if family == "sdxl":
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        make = lambda: TextConditioning(torch.randn(1, 77, 2048), torch.randn(1, 1280), time_ids)
    else:
        make = lambda: TextConditioning(torch.randn(1, 77, 768))
    return make().to(device), make().to(device)


class LabelledNetworks:
    """The networks with each role's calls named in a profile (``fewstep::real_score``: the teacher's CFG pass, ...)."""

    ROLES = ("generator", "real_score", "fake_score", "discriminator")

    def __init__(self, networks):
        self._networks = networks

    def __getattr__(self, name):
        import torch

        attribute = getattr(self._networks, name)
        if name not in self.ROLES:
            return attribute

        def labelled(*args, **kwargs):
            with torch.profiler.record_function(f"fewstep::{name}"):
                return attribute(*args, **kwargs)

        return labelled


def profile_table(step, device, rows: int) -> str:
    """torch.profiler's table of one call of ``step`` (self time, top ``rows`` ops, the role labels included)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    roles = [e for e in averages if e.key.startswith("fewstep::")]
    table = averages.table(sort_by=sort, row_limit=rows)
    total = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    lines = [f"{e.key:<28}{getattr(e, total) / 1e3:>12.1f} ms total, {e.count} calls" for e in roles]
    return table + "\nper role (forward passes, children included):\n" + "\n".join(lines)


def measure_layout(settings: dict, layout: str) -> dict:
    """Build one layout, run 1 + ``iterations`` DMD2 iterations with the GAN on, return peak memory and time."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..core.schedule import NoiseSchedule
    from ..training.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
    from ..training.networks import GANHead, SharedUNetNetworks, attach_adapters, lora_config
    from .sd15 import SD15_SCHEDULER, SD15_UNET

    torch.manual_seed(0)
    family, rank, device = settings["family"], settings["rank"], torch.device(settings["device"])
    unet_config = SD15_UNET if family == "sd15" else SDXL_UNET
    base_dtype = torch.bfloat16 if settings["precision"] == "bf16" else torch.float32
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER).to(device)
    cond, uncond = _conditioning(family, settings["resolution"], device)
    head = GANHead(unet_config["block_out_channels"][-1]).to(device)
    if layout == "shared":
        unet = UNet2DConditionModel(**unet_config).to(device, base_dtype)
        attach_adapters(unet, rank, rank / 8, rank, rank / 8)
        unets = [unet]
        networks = SharedUNetNetworks(unet, schedule, uncond, 1.75, head)
    elif layout == "reference":
        teacher = UNet2DConditionModel(**unet_config).requires_grad_(False).to(device, base_dtype)
        fake = UNet2DConditionModel(**unet_config).to(device)
        generator = UNet2DConditionModel(**unet_config).requires_grad_(False).to(device)
        generator.add_adapter(lora_config(rank, rank / 8), adapter_name="generator")
        unets = [teacher, fake, generator]
        networks = ThreeUNetNetworks(teacher, fake, generator, schedule, uncond, 1.75, head)
    else:
        raise ValueError(f"unknown layout {layout!r}; use shared or reference")
    if settings["gradient_checkpointing"]:
        for unet in unets:
            unet.enable_gradient_checkpointing()
    if settings.get("profile"):
        networks = LabelledNetworks(networks)
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    loop = DMD2Loop(
        networks, adamw(networks.generator_parameters()), adamw(networks.fake_score_parameters()),
        DMD2LoopConfig(dfake_gen_update_ratio=1, gan_generator_weight=5e-3, gan_discriminator_weight=1e-2),
        device=device,
    )  # fmt: skip
    latent = settings["resolution"] // 8
    shape = (1, 4, latent, latent)
    batch = DMD2Batch(shape=shape, cond=cond, real_x0=torch.randn(shape, device=device), real_cond=cond)
    trainable = sum(p.numel() for p in networks.generator_parameters() + networks.fake_score_parameters())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def iteration():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=base_dtype == torch.bfloat16):
            return loop.train_step(batch)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics = iteration()  # warm-up: allocator, kernels, AdamW states
    sync()
    start = time.perf_counter()
    for _ in range(settings["iterations"]):
        metrics = iteration()
    sync()
    seconds = (time.perf_counter() - start) / settings["iterations"]
    if device.type == "cuda":
        peak = {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9, "peak_kind": "torch.cuda.max_memory_allocated"}
    else:
        peak = {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "peak_kind": "peak RSS"}
    result = {
        "layout": layout,
        "unets": len(unets),
        **peak,
        "seconds_per_iteration": seconds,
        "trainable_params": trainable,
        "finite": all(v == v for v in metrics.values()),
    }
    if settings.get("profile"):
        result["profile"] = profile_table(lambda: (iteration(), sync()), device, settings["profile"])
    return result


def _run_subprocess(layout: str, settings: dict, timeout: int) -> dict:
    command = [sys.executable, "-m", "fewstep.benchmarks.memory", layout, json.dumps(settings)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"layout": layout, "error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["failed"]
        killed = done.returncode in (-9, 137) or any("OutOfMemoryError" in line for line in lines[-3:])
        return {"layout": layout, "error": "out of memory" if killed else lines[-1]}
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
    shared = 2 * base + 2 * trained(lora)  # bf16 base, two fp32 adapters
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
    settings = _settings(args)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    results = {}
    for layout in layouts:
        print(f"fewstep bench memory: measuring the {layout} layout in a subprocess ...", flush=True)
        results[layout] = _run_subprocess(layout, settings, args.timeout)
        print(f"fewstep bench memory: {layout}: {json.dumps(results[layout])}", flush=True)  # survives a cut-short run
    measured = all("peak_gb" in results.get(k, {}) for k in ("shared", "reference"))
    ratio = results["shared"]["peak_gb"] / results["reference"]["peak_gb"] if measured else None
    time_ratio = (
        results["shared"]["seconds_per_iteration"] / results["reference"]["seconds_per_iteration"] if measured else None
    )
    device = settings["device"]
    machine = (
        __import__("torch").cuda.get_device_name(device) if device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    )
    return {
        "architecture": f"{settings['family']} UNet (random weights)",
        "settings": settings,
        "layouts": results,
        "ratio": ratio,
        "time_ratio": time_ratio,
        "sdxl_counted": sdxl_state_counts(settings["rank"]),
        "machine": machine,
    }


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"DMD2, one iteration (generator + fake-score update, GAN on), {result['architecture']}, {s['resolution']} px, "
        f"batch 1, base {s['precision']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"LoRA rank {s['rank']}, on {result['machine']}",
        "",
        f"{'layout':<12}{'UNets':>6}{'peak GB':>10}{'s / iteration':>15}{'trainable params':>18}",
    ]
    for name, row in result["layouts"].items():
        if "error" in row:
            lines.append(f"{name:<12}{'':>6}{row['error']:>43}")
        else:
            lines.append(
                f"{name:<12}{row['unets']:>6}{row['peak_gb']:>10.2f}{row['seconds_per_iteration']:>15.3f}"
                f"{row['trainable_params']:>18,}"
            )
    if result["ratio"] is not None:
        lines.append(f"\nshared / reference: peak memory {result['ratio']:.3f}, time per iteration {result['time_ratio']:.3f}")
    sdxl = result["sdxl_counted"]
    lines.append(
        f"SDXL UNet ({sdxl['unet_params'] / 1e9:.2f} B params), {sdxl['note']}: shared {sdxl['shared_state_gb']:.1f} GB"
        f" vs reference {sdxl['reference_state_gb']:.1f} GB, ratio {sdxl['ratio']:.3f}"
    )
    for name, row in result["layouts"].items():
        if row.get("profile"):
            lines += ["", f"profile of one {name} iteration:", row["profile"]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure_layout(json.loads(sys.argv[2]), sys.argv[1])))
