"""``fewstep push``: publish a run on the Hugging Face Hub (model card, both LoRA files, pipeline file)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ORDER = 25


def cmd_push(args: argparse.Namespace) -> None:
    from ..cli import UserError, write_failures
    from ..training.publish.hub import build_upload_folder, upload

    if args.folder and not args.dry_run:
        raise UserError("--folder only applies with --dry-run (a push builds its folder in a temporary directory)")
    if args.dry_run:
        folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="fewstep-push-"))
        with write_failures(folder):
            build_upload_folder(args.run_dir, args.repo_id, folder, args.base_model, args.license, args.lora)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            print(f"  {path.relative_to(folder)} ({path.stat().st_size:,} bytes)")
        print(f"fewstep push --dry-run: nothing uploaded; the folder for {args.repo_id} is")
        print(folder)
        return
    with tempfile.TemporaryDirectory(prefix="fewstep-push-") as temporary, write_failures(Path(temporary)):
        folder = build_upload_folder(
            args.run_dir, args.repo_id, Path(temporary) / "upload", args.base_model, args.license, args.lora
        )
        url = upload(folder, args.repo_id, private=args.private)
    print(f"fewstep push: uploaded {args.run_dir} to {url}")


def register(sub) -> None:
    parser = sub.add_parser(
        "push",
        help="upload a run to the Hugging Face Hub (model card, LoRA files, pipeline)",
        description="Build the Hub folder for a fewstep run (README.md model card, the diffusers and kohya LoRA "
        "files, pipeline.py for custom_pipeline=, config, metrics, samples) and upload it. The token comes from "
        "HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (written by fewstep train)")
    parser.add_argument("--repo-id", required=True, help="the model repo, USER/NAME (created if missing)")
    parser.add_argument(
        "--lora", help="the LoRA folder to publish: an export such as RUN_DIR/lora-step-N (default: RUN_DIR/lora)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="build the folder, upload nothing, print its path last")
    parser.add_argument("--folder", help="with --dry-run: where to build the folder (default: a new temp folder)")
    parser.add_argument("--base-model", help="base model Hub id (default: the run's teacher, when it is a Hub id)")
    parser.add_argument("--license", help="license tag (default: the base family's: creativeml-openrail-m, openrail++)")
    parser.set_defaults(func=cmd_push)
