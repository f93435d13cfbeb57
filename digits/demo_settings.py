"""The settings of ``fewstep demo``'s distillation on the digits teacher (shared by the demo, the digits sweep,
``fewstep bench methods`` and the shipped teacher's record)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DigitsDemoSettings:
    """The distillation settings of the demo: the best of a sweep at 600 iterations (one-step student FD, n=500).

    From ratio 5 / GAN 1e-2 (FD 98.7): 3 fake-score updates per generator update 88.0, + GAN
    weight 5e-2 84.4 (1e-1: 91.8); worse: EMA 0.99 104.8, lr 1e-3 105.6, lr 1e-3 + cosine 103.6, CFG 1.5 93.8.
    600 iterations fit the 10-minute budget on 2 CPU cores; 1,000 did not help (84.4 → 94.7 → 89.0 at 600/800/1000).
    Since (n = 2,000 × 3 seeds, docs/sweeps.md): a fake score of rank 64 instead of 32 gives 77.0 ± 3.3 against
    88.7 ± 4.0 (fake lr 2×: 77.5 ± 5.6; LoRA scale 1/8: 139.3 ± 17.5).
    """

    max_steps: int = 600
    batch_size: int = 32
    lr: float = 5e-4
    rank: int = 32
    guidance_scale: float = 2.0
    dfake_gen_update_ratio: int = 3
    gan_weight: float = 5e-2
    disc_weight: float = 1e-2
    ema_decay: float = 0.9
    lr_schedule: str = "constant"
    warmup_steps: int = 20
    fake_rank: int | None = 64  # None: rank (32); 64 measured better (see above)
    fake_alpha: float | None = None  # None: the fake rank (LoRA scale 1)
    fake_lr: float | None = None  # None: lr
    mixed_precision: str = "no"  # the digits UNet is tiny: full precision on any device
    eval_n: int = 500
    num_pairs: int = 500  # teacher ODE pairs of DMD and progressive distillation
    pair_steps: int = 25
    # DMD's regression weight on the digits (paper: 0.25). At a 150 s budget (bench methods, n=200) the one-step FD
    # was 177.8 at 0.25 and 92.8 at 1.0 (0.25 with 3 fake-score updates per generator update: 104.1); the full
    # bench re-run at 1.0 gave 95.6 (teacher 1-step: 284.2).
    dmd_regression_weight: float = 1.0
    # DMD2's one-step SDXL recipe: condition the one-step student on t = 399 after a regression warm start on the
    # teacher's ODE pairs (``--timesteps 399 --init-regression-steps N``); 999 and 0 are fewstep's defaults.
    conditioning_timestep: int = 999
    init_regression_steps: int = 0
    pd_weighting: str = "truncated_snr"  # Progressive Distillation's loss weight over t (core.losses.PD_WEIGHTINGS)
    dm_timesteps: str = "below_input"  # multi-step DMD2: the DM loss's timesteps per student step (DMD2LoopConfig)
    gan_real_latents: str = "sample"  # the GAN's real latents: VAE posterior samples (the reference) or means

    def fake_score_options(self) -> dict:
        """The fake score's ``fewstep train`` options: rank (None: the generator's), alpha (None: LoRA scale 1), lr."""
        fake_rank = self.fake_rank or self.rank
        return dict(fake_rank=fake_rank, fake_alpha=float(self.fake_alpha or fake_rank), fake_lr=self.fake_lr or self.lr)

    def train_config(self, teacher_dir, run_dir, prompts, real_dir, num_steps: int, seed: int, method: str = "dmd2"):
        """The ``fewstep train --method METHOD`` options of the demo's distillation: the shared ones here, the
        method's own from its ``demo_options``."""
        from ..training.data.pair_cache import TeacherPairOptions
        from ..training.methods import get_method

        chosen = get_method(method)
        options = dict(
            teacher=str(teacher_dir), output=str(run_dir), prompts=str(prompts), batch_size=self.batch_size,
            max_steps=self.max_steps, lr=self.lr, warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
            guidance_scale=self.guidance_scale, gen_rank=self.rank, gen_alpha=float(self.rank),
            checkpoint_every=max(1, self.max_steps // 4), validate_every=0, seed=seed,
            mixed_precision=self.mixed_precision,
        )  # fmt: skip
        if issubclass(chosen.config_class, TeacherPairOptions):  # a method that distils on teacher ODE pairs
            options.update(num_pairs=self.num_pairs, pair_steps=self.pair_steps)
        options.update(chosen.demo_options(self, num_steps, real_dir))
        return chosen.config_class(**options)


# A tiny budget that checks the whole path (``fewstep demo --quick``, CI); no quality.
QUICK = dict(max_steps=2, batch_size=4, rank=4, eval_n=20, warmup_steps=1, num_pairs=8, pair_steps=2)
