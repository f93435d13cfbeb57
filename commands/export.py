"""``fewstep export``: (re)write a run's LoRA files from any of its checkpoints."""

from __future__ import annotations

import argparse

ORDER = 20


def cmd_export(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from ..cli import write_failures
    from ..training.publish.export import export_run

    out = Path(args.out) if args.out else Path(args.run_dir)
    with write_failures(out):
        if args.out:
            out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after loading the UNet
        written = export_run(args.run_dir, args.format, args.checkpoint, args.out)
    for path in written:
        print(f"fewstep: wrote {path}")
    step = json.loads(written[-1].read_text())["step"]
    print(f"fewstep: the LoRA in {written[-1].parent} is from step {step}; `fewstep push --lora {written[-1].parent}` "
          "publishes it")


def register(sub) -> None:
    export = sub.add_parser(
        "export",
        help="write LoRA files (diffusers / ComfyUI+A1111) from a run's checkpoint",
        description="Write a run's LoRA files from a checkpoint: the latest complete one into RUN_DIR/lora/, an older "
        "one (--checkpoint N) into its own RUN_DIR/lora-step-N/; the recipe beside them records the step.",
    )
    export.add_argument("run_dir", help="a fewstep run directory")
    export.add_argument(
        "--format",
        choices=["diffusers", "comfyui", "all"],
        default="all",
        help="diffusers: pytorch_lora_weights.safetensors (PEFT keys + adapter config); comfyui: kohya keys with "
        "the real alpha (ComfyUI, A1111); all: both (default)",
    )
    export.add_argument("--checkpoint", default=None, help="checkpoint directory or step number (default: latest)")
    export.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/lora, or RUN_DIR/lora-step-N for an older step)"
    )
    export.set_defaults(func=cmd_export)
