"""A multi-step student, step by step, on the digits yardstick: which of its steps help and which hurt.

DMD2's multi-step sampler (``core.sampling.sample_few_step``) predicts x0 at each student timestep and re-noises it
with fresh noise to the next. This measures the x0 after every step (FD, accuracy, precision/recall/density/coverage
against the held-out digits, as the yardstick does) and, with ``--grid``, the same student sampled on other
timestep grids (e.g. skipping its low-noise steps)::

    python -m fewstep.benchmarks.student_steps RUN_DIR [RUN_DIR ...] --n 2000 --seeds 0 1 2 --grid 999,499

Each ``RUN_DIR`` (a run directory or a LoRA) is measured at every seed with that seed's noise; given one run per seed
(``--paired``), run i is measured at seed i only, as the digits sweep pairs its distillation and evaluation seeds.
Rows: "step k (t=…)" for the k-th step's x0 on the student's own grid, and "grid …" for each ``--grid``; mean ± sd
over the runs × seeds measured. Writes ``OUT/student_steps.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import mean_sd_cells, script_main

HELP = "a multi-step student's x0 after each of its steps, and on other timestep grids (digits yardstick)"
METRICS = ("fd", "acc", "precision", "recall", "density", "coverage")


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", help="student run directories (or LoRA folders/files)")
    parser.add_argument("--out", default="fewstep-student-steps", help="output folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=2000, help="images per row and seed (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds (default: 0)")
    parser.add_argument("--paired", action="store_true", help="run i at seed i only (as many runs as seeds)")
    parser.add_argument(
        "--grid", action="append", default=[], metavar="T1,T2,...",
        help="also sample on these descending timesteps (repeatable), e.g. 999,499",
    )  # fmt: skip
    parser.add_argument("--teacher", help="a built digits teacher folder (default: the cached one)")
    parser.add_argument("--device", help="device (default: cuda when available, else cpu)")


def parse_grid(text: str) -> list[int]:
    from ..core.schedule import validate_timesteps

    try:
        return validate_timesteps([int(t) for t in text.split(",")])
    except ValueError as error:
        raise SystemExit(f"--grid {text!r}: {error}") from None


def measure(teacher, run, n: int, seed: int, grids: list[list[int]], device: str = "cpu", classifier=None) -> dict:
    """{row: scores} for one student at one seed: its x0 after each of its steps, then each grid's last x0."""
    import torch

    from ..core.sampling import sample_few_step
    from ..digits import yardstick
    from ..training.teacher.loading import decode_latents

    model = yardstick.load_digits_model(teacher, run, device)
    if model.student is None or not model.student.recipe_timesteps:
        raise SystemExit(f"{run}: no student LoRA with a fewstep_recipe.json (written by fewstep train)")
    own = list(model.student.recipe_timesteps)
    classifier = classifier or yardstick.digit_classifier(progress=False)
    held_out = yardstick.load_digits_split()
    reference, _ = classifier.embed(held_out.test_images / 2 + 0.5)
    labels = yardstick.balanced_labels(n)
    noise = yardstick.starting_noise(model, n, seed)
    unet, schedule = model.pipe.unet, model.schedule.to(model.pipe.unet.device)

    def scores(latents: torch.Tensor) -> dict:
        images = torch.cat([decode_latents(model.pipe.vae, latents[i : i + 100]) for i in range(0, n, 100)])
        return yardstick.image_scores(classifier, images, labels, reference, held_out.test_labels)

    def sample(grid: list[int], keep_steps: bool) -> list[torch.Tensor]:
        """The x0 of every step (or only the last) over all n images, the yardstick's noise and fresh-noise seed."""
        generator = yardstick.fresh_noise_generator(seed)
        steps: list[list[torch.Tensor]] = [[] for _ in grid]
        for start in range(0, n, 100):
            chunk = slice(start, start + 100)
            embeds = model.digit_embeds[labels[chunk].to(model.digit_embeds.device)]
            student = yardstick.unet_denoiser(unet, schedule, embeds, lora=True)
            record = lambda i, t, x0: steps[i].append(x0.cpu()) if keep_steps or i == len(grid) - 1 else None
            sample_few_step(student, noise[chunk].to(unet.device), grid, schedule, generator, callback=record)
        return [torch.cat(s) for s in steps if s]

    rows = {}
    with torch.no_grad():
        for k, (t, x0) in enumerate(zip(own, sample(own, keep_steps=True))):
            rows[f"step {k + 1} (t={t})"] = scores(x0)
        for grid in grids:
            rows[f"grid {','.join(map(str, grid))}"] = scores(sample(grid, keep_steps=False)[-1])
    return rows


def summarise(measured: list[dict[str, dict]]) -> list[dict]:
    """Mean ± sd per row over the (run, seed) measurements, in the rows' order."""
    from ..digits.yardstick import mean_sd

    table = []
    for row in measured[0]:
        entry = {"row": row, "measurements": len(measured)}
        for metric in METRICS:
            entry[metric], entry[f"{metric}_sd"] = (round(v, 4) for v in mean_sd(m[row][metric] for m in measured))
        table.append(entry)
    return table


def run(args) -> dict:
    from ..cli import resolve_device
    from ..digits.teacher import digits_teacher

    grids = [parse_grid(text) for text in args.grid]
    if args.paired and len(args.runs) != len(args.seeds):
        raise SystemExit(f"--paired needs one run per seed: got {len(args.runs)} runs and {len(args.seeds)} seeds")
    device = resolve_device(args.device)
    teacher = Path(args.teacher) if args.teacher else digits_teacher(device=device)
    pairs = list(zip(args.runs, args.seeds)) if args.paired else [(r, s) for r in args.runs for s in args.seeds]
    per_run = [{"run": str(r), "seed": s, "rows": measure(teacher, r, args.n, s, grids, device)} for r, s in pairs]
    result = {"rows": summarise([m["rows"] for m in per_run]), "per_run": per_run, "n": args.n}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student_steps.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    header = f"{'row':26}" + "".join(f"{m:>17}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['row']:26}{mean_sd_cells(r, METRICS)}")
    lines.append(f"(n = {result['n']} per measurement, {result['rows'][0]['measurements']} measurements: mean ± sd)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
