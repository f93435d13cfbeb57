"""DMD2 on an exact teacher: a one-step (or few-step) MLP student distilled from a 2-D Gaussian mixture.

The teacher's denoiser is closed-form (``gmm.GaussianMixture.denoise``), so this checks the algorithm itself:
mode coverage (DMD Fig. 3), the sign and scale of the DM gradient, backward simulation and Distillation++.
It drives the same :class:`~fewstep.training.loop.dmd2_loop.DMD2Loop` as the Stable Diffusion trainer.

Each sampler (the student, the teacher's 50-step DDIM, a second draw of the data as the best case) is measured
against one draw of the data: sliced W1, the share of samples within 2σ of a mode and E[−log p_data] (fidelity);
precision/recall and density/coverage (``core.metrics.manifold_metrics``, k = 5, 4,000 points on each side), and
the data's mean log-likelihood under a kernel density estimate on the sampler's points (bandwidth
``KDE_BANDWIDTH``): a student whose samples lie on streaks inside the modes passes the fidelity numbers but leaves
real points' k-NN balls empty, which coverage counts, and the data between its streaks unlikely.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..core.distillpp import sample_distillpp
from ..core.metrics import kde_log_likelihood, manifold_metrics
from ..core.sampling import ddim_timesteps, sample_ddim, sample_few_step
from ..core.schedule import SD_TRAINING_SCHEDULE, NoiseSchedule, student_timesteps
from ..training.loop.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
from .gmm import GaussianMixture, sliced_wasserstein


# A fifth of the modes' std: narrow enough to resolve streaks inside a mode, wide enough that 4,000 data points give
# the data a smooth estimate of its own density.
KDE_BANDWIDTH = 0.05


@dataclass
class ExactTeacherConfig:
    """Settings of the exact-teacher experiment.

    Defaults from a sweep measured with the exact density (one thread, seed 0; fraction of samples within 2σ of a
    mode / E[−log p_data]; data 0.866 / 2.130, 50-step teacher 0.913 / 1.948): 6k iterations ratio 10: 0.676 / 2.86;
    6k ratio 2: 0.781 / 2.42; 10k ratio 5: 0.740 / 2.57; 10k ratio 1: 0.845 / 2.20; 20k ratio 2: 0.852 / 2.18;
    20k ratio 1: 0.869 / 2.11; 10k ratio 1 with 256 hidden units: 0.676 / 2.80. On this toy the fake score keeps
    up even when the generator updates every iteration (the paper's "ratio 1 oscillates" is for ImageNet-scale
    networks).

    That student (20k iterations at batch 256) passed those fidelity numbers with streaks inside its modes: its
    coverage of the data was 0.881 ± 0.018 of the teacher's (4 seeds). Batch 512 for 15k iterations, the same CPU
    time, gives 0.918 ± 0.004 (3 seeds; docs/sweeps.md, "Variety on the exact teacher"), the default since.
    """

    num_modes: int = 8
    radius: float = 2.0
    mode_std: float = 0.25  # modes 6 stds apart: clearly separate, yet a one-step MLP can split them
    num_steps: int = 1  # student steps; 4 → [999, 749, 499, 249]
    backward_simulation: bool = True
    use_fake_score: bool = True
    iterations: int = 15000  # fake-score iterations; generator updates = iterations / ratio
    dfake_gen_update_ratio: int = 1
    batch_size: int = 512  # the generator's and the fake score's batch
    lr: float = 1e-3
    adam_beta1: float = 0.0
    cosine_decay: bool = True  # decay both learning rates to 0 over the run (a converged final iterate)
    dm_min_timestep: int = 20  # the DM loss's t ~ U[dm_min_timestep, 980]
    hidden: int = 128
    num_eval_samples: int = 4000
    seed: int = 0


class TimeMLP(nn.Module):
    """x0 = c_skip·x_t + c_out·F(c_in·x_t, t): an MLP with EDM-style preconditioning for a VP schedule."""

    def __init__(self, schedule: NoiseSchedule, data_std: float, hidden: int = 128):
        super().__init__()
        self.schedule = schedule
        self.data_std = data_std
        # Random Fourier features of x let a small MLP draw the sharp, mode-separating denoisers of a mixture.
        self.register_buffer("fourier", torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 3.0)
        self.net = nn.Sequential(
            nn.Linear(2 + 64 + 16, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sigma = self.schedule.coefficients(t, x_t)
        sd = self.data_std
        total = (a**2 * sd**2 + sigma**2).sqrt()
        c_skip, c_out, c_in = a * sd**2 / total**2, sigma * sd / total, 1 / total
        freqs = torch.arange(8, device=x_t.device, dtype=x_t.dtype)
        phase = (t.to(x_t.dtype)[:, None] / 1000.0) * (2.0**freqs) * math.pi
        projected = (c_in * x_t) @ self.fourier
        features = torch.cat([c_in * x_t, projected.sin(), projected.cos(), phase.sin(), phase.cos()], dim=1)
        return c_skip * x_t + c_out * self.net(features)


class ExactTeacherNetworks:
    """:class:`~fewstep.training.loop.dmd2_loop.DMD2Networks` for the toy: exact real score, MLP generator and fake score."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, hidden: int, seed: int):
        torch.manual_seed(seed)
        data_std = float(mixture.sample(10000, torch.Generator().manual_seed(seed)).std())
        self.mixture = mixture
        self.schedule = schedule
        self.generator_net = TimeMLP(schedule, data_std, hidden)
        self.fake_score_net = TimeMLP(schedule, data_std, hidden)

    def generator(self, x_t, t, cond=None):
        return self.generator_net(x_t, t)

    def real_score(self, x_t, t, cond=None):
        return self.mixture.denoise(x_t, t, self.schedule)

    def fake_score(self, x_t, t, cond=None):
        return self.fake_score_net(x_t, t)

    def discriminator(self, x_t, t, cond=None):
        raise NotImplementedError("the exact-teacher toy has no GAN head")

    def activate(self, network):
        pass  # separate networks: nothing to switch before a backward

    def generator_parameters(self):
        return list(self.generator_net.parameters())

    def fake_score_parameters(self):
        return list(self.fake_score_net.parameters())


@dataclass
class ExactTeacherResult:
    config: dict
    swd_student: float
    swd_teacher_50: float
    swd_data_floor: float  # two independent data draws: the best any sampler can score
    mode_fractions: list[float]
    modes_covered: int  # modes holding ≥ 5% of the student's samples
    seconds: float
    # The density is known exactly: fraction within 2σ of a mode and E[−log p_data] (a ring between the modes
    # passes SWD and a mode count, not these). Keys: "student", "teacher_50", "data".
    within_2std: dict
    cross_entropy: dict
    # Variety against the data: {sampler: {"precision", "recall", "density", "coverage", "data_log_likelihood"}}, same
    # keys; the last is the data's mean log-likelihood under a KDE on the sampler's points.
    variety: dict
    student_samples: torch.Tensor = field(repr=False)
    teacher_samples: torch.Tensor = field(repr=False)
    data_samples: torch.Tensor = field(repr=False)

    def metrics(self) -> dict:
        keys = (
            "swd_student", "swd_teacher_50", "swd_data_floor", "mode_fractions", "modes_covered", "seconds",
            "within_2std", "cross_entropy", "variety",
        )  # fmt: skip
        out = {k: getattr(self, k) for k in keys}
        out["swd_ratio_student_vs_teacher"] = self.swd_student / self.swd_teacher_50
        out["coverage_ratio_student_vs_teacher"] = self.coverage_ratio()
        out["config"] = self.config
        return out

    def coverage_ratio(self) -> float:
        """The student's coverage of the data as a share of the teacher's (1: as much within-mode variety)."""
        return self.variety["student"]["coverage"] / self.variety["teacher_50"]["coverage"]


def format_table(result: ExactTeacherResult) -> str:
    """Fidelity (sliced W1, share within 2σ of a mode) and variety (recall, coverage, the data's KDE log-likelihood)
    of each sampler against the data."""
    lines = [
        f"{'against the data':28}{'sliced W1 ↓':>12}{'within 2σ':>11}{'recall ↑':>10}{'coverage ↑':>12}"
        f"{'log p̂(data) ↑':>16}"
    ]
    rows = (
        ("data vs data (best)", "data", result.swd_data_floor),
        ("teacher 50-step DDIM", "teacher_50", result.swd_teacher_50),
        (f"student {result.config['num_steps']}-step", "student", result.swd_student),
    )
    for title, key, swd in rows:
        variety = result.variety[key]
        lines.append(
            f"{title:28}{swd:>12.4f}{result.within_2std[key]:>11.3f}{variety['recall']:>10.3f}"
            f"{variety['coverage']:>12.3f}{variety['data_log_likelihood']:>16.3f}"
        )
    lines.append(
        f"the student's coverage is {result.coverage_ratio():.2f}× the teacher's; modes covered (≥5% of samples "
        f"each): {result.modes_covered}/{len(result.mode_fractions)}"
    )
    return "\n".join(lines)


def mode_fractions_within(mixture: GaussianMixture, x: torch.Tensor, num_std: float = 4.0) -> torch.Tensor:
    """Fraction of samples within ``num_std`` component stds of each mode (samples between modes count for none)."""
    distance = torch.cdist(x.double(), mixture.means)  # (N, K)
    nearest = distance.argmin(dim=1)
    close = distance.gather(1, nearest[:, None]).squeeze(1) <= num_std * mixture.std
    counts = torch.bincount(nearest[close], minlength=mixture.means.shape[0])
    return counts.double() / x.shape[0]


def teacher_samples(mixture, schedule, n: int, num_steps: int = 50, seed: int = 1) -> torch.Tensor:
    """The exact teacher's own deterministic DDIM sampler (trailing spacing)."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return sample_ddim(
        lambda x, t: mixture.denoise(x, t, schedule), noise, ddim_timesteps(num_steps), schedule
    )


def student_samples(networks, timesteps, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        return sample_few_step(
            lambda x, t: networks.generator(x, torch.full((n,), t)), noise, timesteps, networks.schedule, g
        )


def train_exact_teacher(config: ExactTeacherConfig, progress=None) -> ExactTeacherResult:
    """Distil a student from the exact mixture teacher with DMD2 and measure it against the data."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    # The networks return x0; the prediction type only sets the fake score's loss weight: v-MSE = (SNR + 1)·x0-MSE,
    # which fits both the sharp low-noise and the smooth high-noise denoisers (x0-MSE underweights low noise).
    schedule = NoiseSchedule.from_config({**SD_TRAINING_SCHEDULE, "prediction_type": "v_prediction"})
    mixture = GaussianMixture.ring(config.num_modes, config.radius, config.mode_std)
    networks = ExactTeacherNetworks(mixture, schedule, config.hidden, config.seed)
    timesteps = student_timesteps(config.num_steps)
    adam = dict(lr=config.lr, betas=(config.adam_beta1, 0.99))
    generator_optimizer = torch.optim.Adam(networks.generator_parameters(), **adam)
    fake_score_optimizer = torch.optim.Adam(networks.fake_score_parameters(), **adam)
    def cosine(total: int):
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)) if config.cosine_decay else 1.0

    loop = DMD2Loop(
        networks,
        generator_optimizer,
        fake_score_optimizer,
        DMD2LoopConfig(
            student_timesteps=timesteps,
            dfake_gen_update_ratio=config.dfake_gen_update_ratio,
            backward_simulation=config.backward_simulation,
            use_fake_score=config.use_fake_score,
            dm_min_timestep=config.dm_min_timestep,
        ),
        seed=config.seed,
        generator_lr_scheduler=torch.optim.lr_scheduler.LambdaLR(generator_optimizer, cosine(config.iterations)),
        fake_score_lr_scheduler=torch.optim.lr_scheduler.LambdaLR(fake_score_optimizer, cosine(config.iterations)),
    )
    data_rng = torch.Generator().manual_seed(config.seed + 7)
    for _ in range(config.iterations):
        real = mixture.sample(config.batch_size, data_rng)
        metrics = loop.train_step(DMD2Batch(shape=(config.batch_size, 2), real_x0=real))
        if progress is not None:
            progress(metrics)

    n = config.num_eval_samples
    data = mixture.sample(n, torch.Generator().manual_seed(config.seed + 100))
    floor = mixture.sample(n, torch.Generator().manual_seed(config.seed + 101))
    teacher = teacher_samples(mixture, schedule, n, seed=config.seed + 1)
    student = student_samples(networks, timesteps, n, seed=config.seed + 2)
    fractions = mode_fractions_within(mixture, student)
    samples = {"student": student, "teacher_50": teacher, "data": floor}
    return ExactTeacherResult(
        config=asdict(config),
        swd_student=sliced_wasserstein(student, data),
        swd_teacher_50=sliced_wasserstein(teacher, data),
        swd_data_floor=sliced_wasserstein(floor, data),
        mode_fractions=[round(float(f), 4) for f in fractions],
        modes_covered=int((fractions >= 0.05).sum()),
        seconds=time.perf_counter() - start,
        within_2std={name: mixture.fraction_within(x) for name, x in samples.items()},
        cross_entropy={name: mixture.cross_entropy(x) for name, x in samples.items()},
        variety={
            name: {**manifold_metrics(data, x), "data_log_likelihood": kde_log_likelihood(x, data, KDE_BANDWIDTH)}
            for name, x in samples.items()
        },
        student_samples=student,
        teacher_samples=teacher,
        data_samples=data,
    )


def biased_student_distillpp(
    lams: list[float], num_steps: int = 4, guided_steps: int = 4, n: int = 4000, seed: int = 0
) -> dict[float, float]:
    """SWD to the data of a deliberately biased student refined by the exact teacher, for each λ.

    The student is the exact denoiser scaled by 0.8 (a shrunken, blurred ring: the typical distilled-student
    error). Same noise for every λ, so only λ changes.
    """
    schedule = NoiseSchedule.from_config({**SD_TRAINING_SCHEDULE, "prediction_type": "v_prediction"})
    mixture = GaussianMixture.ring(std=ExactTeacherConfig.mode_std)
    timesteps = student_timesteps(num_steps)
    data = mixture.sample(n, torch.Generator().manual_seed(seed + 100))
    distances = {}
    for lam in lams:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, 2, generator=g)
        samples = sample_distillpp(
            lambda x, t: 0.8 * mixture.denoise(x, t, schedule),
            lambda x, t: mixture.denoise(x, t, schedule),
            noise,
            timesteps,
            schedule,
            lam,
            guided_steps,
            g,
        )
        distances[lam] = sliced_wasserstein(samples, data)
    return distances
