"""``fewstep bench memory``: peak memory and time of DMD2 iterations, fewstep's shared base vs the reference's layout.

One iteration = a generator update (DM loss + GAN generator loss) and a fake-score update (denoising loss + GAN
discriminator loss on real latents), batch 1, at the real SD1.5 or SDXL UNet architecture (random weights), in the
configuration a user on one GPU picks: base weights in bf16 under autocast, fp32 LoRA adapters, gradient
checkpointing (``--precision``/``--no-gradient-checkpointing`` change it). Each layout runs in its own subprocess
(peak memory is per process; the reference layout can exhaust the machine); an out-of-memory death is reported as such.

- ``shared``: ONE frozen UNet + LoRA adapters ``generator`` and ``fake_score`` + the GAN head (fewstep).
- ``reference``: the DMD2 authors' LoRA mode as they run it: a frozen teacher UNet in the run's precision, a fully
  trained fp32 fake-score UNet with their discriminator head (:func:`reference_gan_head`), and an fp32 generator
  UNet + LoRA.

Both layouts run fewstep's DMD2 loop: the same passes (the discriminator stops at the mid block in both, as the
reference's classify mode does), the same checkpointing and autocast. The authors' own code also runs its
discriminator passes without checkpointing and the DM loss's fake-score pass in fp32; that would cost the reference
more memory and time, and is not modelled.

``--device cuda`` measures ``torch.cuda.max_memory_allocated``; on the CPU the same quantity, the peak of live tensor
bytes, counted by a dispatch mode (:class:`CPUTensorPeak`), with the process's peak RSS beside it. Time: the mean of
``--iterations`` iterations after one warm-up (two on the CPU, counted for memory), then one more timed by part
(:func:`time_breakdown`). SDXL's layouts are also counted (parameter, gradient and AdamW-state bytes, no
activations) where they cannot be run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable

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
LAYOUTS = {
    "shared": "fewstep: one frozen UNet, LoRA adapters generator and fake_score, the GAN head",
    "reference": "the DMD2 authors' LoRA mode: teacher, fully trained fake score and generator + LoRA, three UNets",
    "shared-no-checkpointing": "shared without gradient checkpointing, whatever the setting (fewstep's SD1.5 default)",
}


def checkpointed(settings: dict, layout: str) -> bool:
    return settings["gradient_checkpointing"] and layout != "shared-no-checkpointing"


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
    parser.add_argument(
        "--layouts", default="shared,reference",
        help="comma-separated layouts to measure: " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
        + " (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per layout (default: %(default)s)")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS",
        help="also profile one more iteration per layout (torch.profiler) and print its top ROWS ops by self time; "
        "each network role's passes are labelled fewstep::generator, fewstep::real_score, ... (default: off)",
    )  # fmt: skip


def _settings(args) -> dict:
    from ..cli import resolve_device

    device = resolve_device(args.device)
    resolution = args.resolution or DEFAULT_RESOLUTION[args.family]
    if resolution < 64 or resolution % 64:
        raise ValueError(f"--resolution must be a positive multiple of 64, got {resolution}")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be ≥ 1, got {args.iterations}")
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise ValueError(f"--layouts: unknown layout {', '.join(unknown) or '(none given)'}; use {', '.join(LAYOUTS)}")
    return dict(
        family=args.family, rank=args.rank, resolution=resolution, device=device,
        precision=args.precision or ("bf16" if device.startswith("cuda") else "fp32"),
        gradient_checkpointing=args.gradient_checkpointing, iterations=args.iterations, profile=args.profile,
        layouts=layouts,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ one layout
class ThreeUNetNetworks:
    """The reference layout behind the same DMD2Networks interface: three separate UNets, GAN head on the fake one."""

    def __init__(self, teacher, fake, generator, schedule, uncond, guidance_scale, gan_head):
        from ..training.loop.networks import MidBlockReader

        self.teacher, self.fake, self.generator_unet = teacher, fake, generator
        self.schedule, self.uncond, self.guidance_scale, self.gan_head = schedule, uncond, guidance_scale, gan_head
        self._mid_block = MidBlockReader(fake)

    def _x0(self, unet, x_t, t, cond):
        from ..training.loop.networks import unet_x0

        return unet_x0(unet, self.schedule, x_t, t, cond)

    def generator(self, x_t, t, cond):
        return self._x0(self.generator_unet, x_t, t, cond)

    def real_score(self, x_t, t, cond):
        from ..training.loop.networks import cfg_x0

        teacher_x0 = lambda x, tt, c: self._x0(self.teacher, x, tt, c)
        return cfg_x0(teacher_x0, x_t, t, cond, self.uncond, self.guidance_scale)

    def fake_score(self, x_t, t, cond):
        return self._x0(self.fake, x_t, t, cond)

    def discriminator(self, x_t, t, cond):
        return self.gan_head(self._mid_block(x_t, t, cond))  # the reference's classify mode stops there too

    def activate(self, network):
        pass  # three separate UNets: nothing to switch before a backward

    def generator_parameters(self):
        return [p for p in self.generator_unet.parameters() if p.requires_grad]

    def fake_score_parameters(self):
        return list(self.fake.parameters()) + list(self.gan_head.parameters())


def reference_gan_head(channels: int, family: str):
    """The DMD2 reference's discriminator head: Conv4×4 blocks from the mid-block features to 1×1, then a 1×1 conv.

    Its stride-2 blocks take the mid block from 8×8 (SD1.5 at 512 px: one block) or 32×32 (SDXL at 1024 px: three)
    to 4×4, a stride-4 block to 1×1. Twice (SD1.5) or four times (SDXL) the parameters of fewstep's
    :class:`~fewstep.training.loop.networks.GANHead`, all trained with AdamW. The adaptive pool lets other resolutions run.
    """
    from torch import nn

    def block(stride, padding):
        return [nn.Conv2d(channels, channels, 4, stride, padding), nn.GroupNorm(32, channels), nn.SiLU()]

    halvings = 1 if family == "sd15" else 3
    layers = [layer for _ in range(halvings) for layer in block(2, 1)]
    layers += [nn.AdaptiveAvgPool2d(4), *block(4, 0), nn.Conv2d(channels, 1, 1), nn.Flatten(0)]
    return nn.Sequential(*layers)


def _conditioning(family: str, resolution: int, device):
    import torch

    from ..training.loop.networks import TextConditioning

    if family == "sdxl":
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        make = lambda: TextConditioning(torch.randn(1, 77, 2048), torch.randn(1, 1280), time_ids)
    else:
        make = lambda: TextConditioning(torch.randn(1, 77, 768))
    return make().to(device), make().to(device)


class LabelledNetworks:
    """The networks with each role's calls named in a profile (``fewstep::real_score``: the teacher's CFG pass, ...).

    While ``clock`` is a dict, each role's forward passes also add their synchronized wall time to it.
    """

    ROLES = ("generator", "real_score", "fake_score", "discriminator")

    def __init__(self, networks, sync=lambda: None):
        self._networks = networks
        self._sync = sync
        self.clock: dict | None = None

    def __getattr__(self, name):
        import torch

        attribute = getattr(self._networks, name)
        if name not in self.ROLES:
            return attribute

        def labelled(*args, **kwargs):
            with torch.profiler.record_function(f"fewstep::{name}"):
                if self.clock is None:
                    return attribute(*args, **kwargs)
                self._sync()
                start = time.perf_counter()
                out = attribute(*args, **kwargs)
                self._sync()
                key = f"{name} forward"
                self.clock[key] = self.clock.get(key, 0.0) + time.perf_counter() - start
                return out

        return labelled


BREAKDOWN_REST = "backward, losses, the rest"


def time_breakdown(built) -> dict:
    """One more iteration, timed by part: each role's forward passes, each optimizer step, and the rest.

    The rest is mostly backward (with gradient checkpointing it recomputes the forwards it needs). Every part is
    synchronized on CUDA, so this iteration runs a little slower than the timed ones.
    """
    clock: dict = {}
    handles = []
    for role, optimizer in built.loop.optimizers.items():
        started = {}

        def pre(optimizer, args, kwargs, started=started):
            built.sync()
            started["t"] = time.perf_counter()

        def post(optimizer, args, kwargs, started=started, key=f"{role} optimizer step"):
            built.sync()
            clock[key] = clock.get(key, 0.0) + time.perf_counter() - started["t"]

        handles += [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    built.networks.clock = clock
    built.sync()
    start = time.perf_counter()
    built.iteration()
    built.sync()
    total = time.perf_counter() - start
    built.networks.clock = None
    for handle in handles:
        handle.remove()
    return {**clock, BREAKDOWN_REST: total - sum(clock.values()), "iteration": total}


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


class CPUTensorPeak:
    """Peak bytes of live CPU tensors, the CPU's counterpart of ``torch.cuda.max_memory_allocated``.

    The CPU allocator keeps no statistics, so a dispatch mode sees every tensor an op returns and counts its storage
    once, until ``weakref.finalize`` says the storage is gone (torch keeps a storage's Python object alive exactly as
    long as the storage). It must be entered before anything it counts is made, so it wraps the build too;
    :meth:`reset_peak` starts the peak from what is live then, as ``torch.cuda.reset_peak_memory_stats`` does.
    Not counted: scratch memory inside one kernel (gone when it returns). torch.profiler's memory events would count
    that too, but the profiler holds its events in memory: ~2 GB more for one SD1.5 iteration at 512 px, which the
    reference layout does not leave free on a 23 GB machine.
    Peak RSS would also count the Python/torch runtime and the malloc arenas' high-water mark, in both layouts.
    """

    def __init__(self):
        self.live = self.peak = 0
        self._mode = None
        self._counted: set[int] = set()  # ids of the live storages already counted

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class CountStorages(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                        tracker._count(leaf.untyped_storage())
                return out

        self._mode = CountStorages()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def _count(self, storage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key in self._counted or nbytes == 0:
            return
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def peak_bytes(self) -> int:
        return self.peak


def measure_layout(settings: dict, layout: str) -> dict:
    """Build one layout, run DMD2 iterations with the GAN on, return peak memory and time per iteration.

    CUDA: the peak of every iteration after the build, then the mean time of ``iterations`` after a warm-up.
    CPU: the peak of live tensors over a warm-up and one more iteration, counted by :class:`CPUTensorPeak`, then the
    mean time of ``iterations`` more, uncounted. Peak RSS is reported beside it.
    """
    import contextlib

    import torch

    device = torch.device(settings["device"])
    tracker = CPUTensorPeak() if device.type == "cpu" else None
    with tracker or contextlib.nullcontext():
        built = _build_layout(settings, layout, device)
        if tracker:
            tracker.reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        metrics = built.iteration()  # warm-up: allocator, kernels, AdamW states
        if tracker:
            metrics = built.iteration()  # the steady state, AdamW states included throughout
        built.sync()
    start = time.perf_counter()
    for _ in range(settings["iterations"]):
        metrics = built.iteration()
    built.sync()
    seconds = (time.perf_counter() - start) / settings["iterations"]
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if device.type == "cuda":
        peak = {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9, "peak_kind": "torch.cuda.max_memory_allocated"}
    else:
        peak = {"peak_gb": tracker.peak_bytes() / 1e9, "peak_kind": "live CPU tensors (counted per storage)"}
    result = {
        "layout": layout,
        "gradient_checkpointing": checkpointed(settings, layout),
        "unets": built.unets,
        **peak,
        "peak_rss_gb": rss_gb,
        "seconds_per_iteration": seconds,
        "trainable_params": built.trainable,
        "finite": all(v == v for v in metrics.values()),
        "breakdown": time_breakdown(built),
    }
    if settings.get("profile"):
        result["profile"] = profile_table(lambda: (built.iteration(), built.sync()), device, settings["profile"])
    return result


@dataclass
class BuiltLayout:
    iteration: Callable[[], dict]  # one DMD2 iteration under the layout's autocast
    sync: Callable[[], None]
    networks: LabelledNetworks
    loop: object  # the DMD2Loop
    unets: int
    trainable: int


def _build_layout(settings: dict, layout: str, device):
    """One layout's networks and DMD2 loop, ready to iterate."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..core.schedule import NoiseSchedule
    from ..training.loop.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
    from ..training.loop.networks import GANHead, SharedUNetNetworks, attach_adapters, lora_config
    from .sd15 import SD15_SCHEDULER, SD15_UNET

    torch.manual_seed(0)
    family, rank = settings["family"], settings["rank"]
    unet_config = SD15_UNET if family == "sd15" else SDXL_UNET
    base_dtype = torch.bfloat16 if settings["precision"] == "bf16" else torch.float32
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER).to(device)
    cond, uncond = _conditioning(family, settings["resolution"], device)
    mid_channels = unet_config["block_out_channels"][-1]
    if layout in ("shared", "shared-no-checkpointing"):
        unet = UNet2DConditionModel(**unet_config).to(device, base_dtype)
        attach_adapters(unet, rank, rank / 8, rank, rank / 8)
        unets = [unet]
        networks = SharedUNetNetworks(unet, schedule, uncond, 1.75, GANHead(mid_channels).to(device))
    elif layout == "reference":
        teacher = UNet2DConditionModel(**unet_config).requires_grad_(False).to(device, base_dtype)
        fake = UNet2DConditionModel(**unet_config).to(device)
        generator = UNet2DConditionModel(**unet_config).requires_grad_(False).to(device)
        generator.add_adapter(lora_config(rank, rank / 8), adapter_name="generator")
        unets = [teacher, fake, generator]
        head = reference_gan_head(mid_channels, family).to(device)
        networks = ThreeUNetNetworks(teacher, fake, generator, schedule, uncond, 1.75, head)
    else:
        raise ValueError(f"unknown layout {layout!r}; use {', '.join(LAYOUTS)}")
    if checkpointed(settings, layout):
        for unet in unets:
            unet.enable_gradient_checkpointing()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    networks = LabelledNetworks(networks, sync)
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

    def iteration():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=base_dtype == torch.bfloat16):
            return loop.train_step(batch)

    return BuiltLayout(iteration, sync, networks, loop, len(unets), trainable)


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

    from ..training.loop.networks import LORA_TARGET_MODULES

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

    from ..training.loop.networks import GANHead

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        channels = SDXL_UNET["block_out_channels"][-1]
        heads = GANHead(channels), reference_gan_head(channels, "sdxl")
        head, reference_head = (sum(p.numel() for p in h.parameters()) for h in heads)
    base = sum(p.numel() for p in unet.parameters())
    lora = _lora_params(unet, rank)
    trained = lambda n: 4 * n * 4  # fp32 param + grad + two Adam moments
    shared = 2 * base + 2 * trained(lora) + trained(head)  # bf16 base, two fp32 adapters, fewstep's GAN head
    # bf16 teacher, full fake score with the authors' head, fp32 generator + LoRA
    reference = 2 * base + trained(base + reference_head) + (4 * base + trained(lora))
    return {
        "unet_params": base,
        "lora_params_per_adapter": lora,
        "gan_head_params": {"shared": head, "reference": reference_head},
        "shared_state_gb": shared / 1e9,
        "reference_state_gb": reference / 1e9,
        "ratio": shared / reference,
        "note": "counted, not measured: parameter, gradient and AdamW-state bytes, no activations",
    }


# ------------------------------------------------------------------------------------------ the command
def run(args) -> dict:
    settings = _settings(args)
    results = {}
    for layout in settings["layouts"]:
        print(f"fewstep bench memory: measuring the {layout} layout in a subprocess ...", flush=True)
        results[layout] = _run_subprocess(layout, settings, args.timeout)
        print(f"fewstep bench memory: {layout}: {json.dumps(results[layout])}", flush=True)  # survives a cut-short run
    reference = results.get("reference", {})
    ratios = {
        name: {
            "peak": row["peak_gb"] / reference["peak_gb"],
            "time": row["seconds_per_iteration"] / reference["seconds_per_iteration"],
        }
        for name, row in results.items()
        if name != "reference" and "peak_gb" in row and "peak_gb" in reference
    }
    device = settings["device"]
    machine = (
        __import__("torch").cuda.get_device_name(device) if device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    )
    return {
        "architecture": f"{settings['family']} UNet (random weights)",
        "settings": settings,
        "layouts": results,
        "ratio": ratios.get("shared", {}).get("peak"),
        "time_ratio": ratios.get("shared", {}).get("time"),
        "ratios": ratios,
        "sdxl_counted": sdxl_state_counts(settings["rank"]),
        "machine": machine,
    }


def format_breakdown(layouts: dict) -> list[str]:
    """Each layout's time by part, side by side, with shared / reference where both ran."""
    rows = {name: row["breakdown"] for name, row in layouts.items() if "breakdown" in row}
    if not rows:
        return []
    forwards = [f"{role} forward" for role in LabelledNetworks.ROLES]
    steps = sorted({key for r in rows.values() for key in r if key.endswith("optimizer step")})
    keys = [key for key in forwards if any(key in r for r in rows.values())] + steps + [BREAKDOWN_REST, "iteration"]
    both = "shared" in rows and "reference" in rows
    widths = {name: max(12, len(name) + 2) for name in rows}
    header = f"{'one more iteration, by part (s)':<34}" + "".join(f"{name:>{widths[name]}}" for name in rows)
    lines = ["", header + (f"{'shared / reference':>20}" if both else "")]
    for key in keys:
        line = f"{key:<34}" + "".join(f"{r.get(key, 0.0):>{widths[name]}.3f}" for name, r in rows.items())
        if both and rows["reference"].get(key):
            line += f"{rows['shared'].get(key, 0.0) / rows['reference'][key]:>20.3f}"
        lines.append(line)
    lines.append(f"(forwards are whole calls; '{BREAKDOWN_REST}' is mostly backward, checkpoint recomputes included)")
    return lines


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"DMD2, one iteration (generator + fake-score update, GAN on), {result['architecture']}, {s['resolution']} px, "
        f"batch 1, base {s['precision']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"LoRA rank {s['rank']}, on {result['machine']}",
        "",
        f"{'layout':<25}{'checkpointing':>14}{'UNets':>6}{'peak GB':>10}{'peak RSS GB':>13}{'s / iteration':>15}"
        f"{'trainable params':>18}",
    ]
    for name, row in result["layouts"].items():
        if "error" in row:
            lines.append(f"{name:<25}{row['error']:>76}")
        else:
            lines.append(
                f"{name:<25}{'on' if row['gradient_checkpointing'] else 'off':>14}{row['unets']:>6}"
                f"{row['peak_gb']:>10.2f}{row['peak_rss_gb']:>13.2f}{row['seconds_per_iteration']:>15.3f}"
                f"{row['trainable_params']:>18,}"
            )
    kinds = sorted({row["peak_kind"] for row in result["layouts"].values() if "peak_kind" in row})
    if kinds:
        lines.append(f"peak GB = {', '.join(kinds)}; peak RSS GB = the process's resident high-water mark")
    for name, ratio in result.get("ratios", {}).items():
        lines.append(f"{name} / reference: peak memory {ratio['peak']:.3f}, time per iteration {ratio['time']:.3f}")
    sdxl = result["sdxl_counted"]
    lines.append(
        f"SDXL UNet ({sdxl['unet_params'] / 1e9:.2f} B params), {sdxl['note']}: shared {sdxl['shared_state_gb']:.1f} GB"
        f" vs reference {sdxl['reference_state_gb']:.1f} GB, ratio {sdxl['ratio']:.3f}"
    )
    lines += format_breakdown(result["layouts"])
    for name, row in result["layouts"].items():
        if row.get("profile"):
            lines += ["", f"profile of one {name} iteration:", row["profile"]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure_layout(json.loads(sys.argv[2]), sys.argv[1])))
