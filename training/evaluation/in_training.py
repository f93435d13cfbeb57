"""``fewstep train --eval-every N --eval-prompts FILE``: the metrics of ``fewstep eval`` on a few prompts, during
training.

Every N iterations and after the last one, on the main process: the student (with its EMA weights when the run keeps
them) samples ``--eval-images-per-prompt`` images of each prompt from fixed noise, against the teacher's images from
the same noise (``--eval-teacher-steps`` DDIM steps at the distillation CFG; sampled and scored once). The scores are
logged to the trackers as ``eval/<row>/<metric>`` (``eval/student/fd``, ``eval/student/clip_score``, ...), and
``RUN_DIR/eval/`` holds the latest evaluation's ``metrics.json``, ``report.html`` and ``report.png`` — what
``fewstep push`` puts in the model card. Each evaluation costs the student's sampling of those images plus the
metric models' passes: keep the prompts few (4–8).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...core.sampling import ddim_timesteps, sample_ddim
from ..loop.networks import TextConditioning
from .rows import TeacherRow
from .scoring import RowEmbeddings, Scorer, result_of

EVAL_BATCH = 8  # images per sampling call
EVAL_DIR = "eval"


class TrainingEvaluation:
    """The teacher-vs-student metrics of a run on fixed prompts and noise (:meth:`prepare`, :meth:`start`,
    :meth:`run`)."""

    def __init__(self, config, family: str, prompts: list[str], scorer: Scorer, cond: TextConditioning):
        self.config, self.family, self.prompts, self.scorer, self.cond = config, family, prompts, scorer, cond
        self.text_embeds = scorer.embed_texts(prompts)
        per_prompt = config.eval_images_per_prompt
        self.prompt_indices = [i // per_prompt for i in range(len(prompts) * per_prompt)]
        self.teacher = RowEmbeddings()
        self.last_step: int | None = None

    @classmethod
    def prepare(cls, config, pipe, family: str, device: torch.device) -> "TrainingEvaluation | None":
        """Load the metric models and encode the prompts with the teacher's text encoders (before training drops
        them); None when ``--eval-every`` is 0."""
        from ..data.prompts import read_prompts
        from ..teacher.loading import encode_prompts
        from .scoring import load_scorer

        if not config.eval_every:
            return None
        prompts = read_prompts(config.eval_prompts)
        scorer = load_scorer(config.eval_metric_model, config.eval_clip_model, device,
                             options=("--eval-metric-model", "--eval-clip-model"))  # fmt: skip
        repeated = [prompt for prompt in prompts for _ in range(config.eval_images_per_prompt)]
        return cls(config, family, prompts, scorer, encode_prompts(pipe, family, repeated, config.resolution))

    def start(self, run_dir: Path, run, encoded, ema) -> "TrainingEvaluation":
        """Bind the run: its student sampler and teacher (``MethodRun``), the VAE and schedule, the EMA."""
        self.dir, self.method_run, self.encoded, self.ema = Path(run_dir) / EVAL_DIR, run, encoded, ema
        self.device = next(encoded.unet.parameters()).device
        shape = (len(self.prompt_indices), *encoded.latent_shape)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.config.seed))
        return self

    @torch.no_grad()
    def _embed(self, sample) -> RowEmbeddings:
        """Sample (``sample(noise, cond) -> latents``) and score every image, :data:`EVAL_BATCH` at a time."""
        from ..teacher.loading import decode_latents

        embeddings = RowEmbeddings()
        for start in range(0, len(self.noise), EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            started = time.perf_counter()
            latents = sample(self.noise[rows].to(self.device), self.cond.select(rows).to(self.device))
            images = decode_latents(self.encoded.vae, latents)
            embeddings.seconds += time.perf_counter() - started
            embeddings.add(self.scorer, images, self.prompt_indices[rows], self.text_embeds)
        return embeddings

    def _teacher_latents(self, noise: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        schedule, steps = self.encoded.schedule, self.config.eval_teacher_steps
        teacher = lambda x, t: self.method_run.teacher(x, torch.full((x.shape[0],), t, device=x.device), cond)
        return sample_ddim(teacher, noise, ddim_timesteps(steps, schedule.num_train_timesteps), schedule)

    def run(self, step: int, writer=None) -> dict:
        """Evaluate the student at ``step``: log ``eval/<row>/<metric>`` and write ``RUN_DIR/eval/``."""
        from ..loop.ema import ema_weights
        from .report import write_report

        teacher_row = TeacherRow(self.config.eval_teacher_steps, self.config.guidance_scale)
        if not self.teacher.features:
            self.teacher = self._embed(self._teacher_latents)
        with ema_weights(self.ema):
            student = self._embed(self.method_run.sample_student)
        titles = {teacher_row.name: teacher_row.describe(), "student": f"student at step {step}"}
        settings = {"step": step, "teacher": self.config.teacher, "family": self.family,
                    "resolution": self.config.resolution, "seed": self.config.seed,
                    "images_per_prompt": self.config.eval_images_per_prompt}  # fmt: skip
        embedded = {teacher_row.name: self.teacher, "student": student}
        result = result_of(embedded, titles, self.prompts, settings, self.scorer)
        write_report(self.dir, result, {name: row.thumbnails for name, row in embedded.items()})
        if writer is not None:
            for row, metrics in result["rows"].items():
                for key, value in metrics.items():
                    if value is not None and key != "images":
                        writer.add_scalar(f"eval/{row}/{key}", value, step)
        self.last_step = step
        return result
