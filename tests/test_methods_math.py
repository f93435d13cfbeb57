"""The math of DMD's regression and Progressive Distillation, and the teacher-pair cache, on analytic stand-ins.

No UNet here: the networks are small tensor functions, so each test checks one formula or one invariant.
"""

import json

import pytest
import torch

from fewstep.core.losses import progressive_target
from fewstep.core.sampling import ddim_step, ddim_timesteps
from fewstep.core.schedule import SD_TRAINING_SCHEDULE, NoiseSchedule
from fewstep.training.loop.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
from fewstep.training.loop.regression import DMDBatch, DMDLoop
from fewstep.training.methods.progressive import ProgressiveBatch, ProgressiveLoop, pd_timesteps, round_step_counts
from fewstep.training.data.pair_cache import PairCacheMismatch, ensure_teacher_pairs, load_teacher_pairs

SCHEDULE = NoiseSchedule.from_config(SD_TRAINING_SCHEDULE)
SHAPE = (3, 2, 4, 4)


def analytic_teacher(x_t, t, cond=None):
    """A smooth, nonlinear, timestep-dependent x0 estimate (stands in for the base UNet with CFG)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x_t.ndim - 1)))
    return torch.tanh(0.7 * x_t) * (1.0 + t / 1000.0) + 0.1


class StandInNetworks:
    """Generator = a callable with one learnable offset; teacher = :func:`analytic_teacher`; no fake score."""

    schedule = SCHEDULE

    def __init__(self, generator):
        self.offset = torch.nn.Parameter(torch.zeros(SHAPE[1:]))
        self.previous = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self._generator = generator
        self.active = []

    def generator(self, x_t, t, cond):
        return self._generator(x_t, t) + self.offset

    def real_score(self, x_t, t, cond):
        return analytic_teacher(x_t, t)

    fake_score = real_score

    def activate(self, network):
        self.active.append(network)

    def generator_parameters(self):
        return [self.offset]

    def fake_score_parameters(self):
        return [self.previous]


# ----------------------------------------------------------------------------------- DMD2's DM-loss timesteps
class RecordingNetworks(StandInNetworks):
    """The stand-ins, recording the timesteps the real score is asked at (the DM loss's t)."""

    def __init__(self, generator):
        super().__init__(generator)
        self.real_score_timesteps = []

    def real_score(self, x_t, t, cond):
        self.real_score_timesteps.append(t.tolist())
        return analytic_teacher(x_t, t)


def dm_timesteps_by_input(dm_timesteps: str, iterations: int = 60) -> dict[int, list[int]]:
    """{input timestep of the student step: the DM loss's t drawn for its samples} over ``iterations`` draws."""
    networks = RecordingNetworks(lambda x_t, t: torch.tanh(x_t))
    sgd = lambda params: torch.optim.SGD(params, lr=0.0)
    config = DMD2LoopConfig(student_timesteps=[999, 749, 499, 249], dm_timesteps=dm_timesteps)
    loop = DMD2Loop(networks, sgd(networks.generator_parameters()), sgd(networks.fake_score_parameters()), config)
    drawn: dict[int, list[int]] = {}
    for _ in range(iterations):
        x, cond = loop.generate(DMD2Batch(shape=SHAPE), grad=False)
        networks.real_score_timesteps.clear()
        loop.generator_loss(x, cond)
        drawn.setdefault(loop.input_timestep, []).extend(networks.real_score_timesteps[0])
    return drawn


def test_below_input_keeps_each_student_steps_dm_loss_at_or_below_its_input_timestep():
    drawn = dm_timesteps_by_input("below_input")
    assert sorted(drawn) == [249, 499, 749, 999]  # every student step was drawn (999: the step from pure noise)
    for input_timestep, ts in drawn.items():
        assert min(ts) >= 20 and max(ts) <= min(input_timestep, 980)
    assert max(drawn[999]) > 749  # the first step keeps the whole range


def test_full_dm_range_is_the_same_for_every_student_step():
    drawn = dm_timesteps_by_input("full")
    assert all(max(ts) > 749 and min(ts) < 249 for ts in drawn.values())  # the reference: t ~ U[20, 980] each


def test_an_unknown_dm_timestep_range_is_refused():
    networks = StandInNetworks(lambda x_t, t: x_t)
    sgd = torch.optim.SGD(networks.generator_parameters(), lr=0.0)
    with pytest.raises(ValueError, match="dm_timesteps must be one of full, below_input"):
        DMD2Loop(networks, sgd, sgd, DMD2LoopConfig(dm_timesteps="below"))


# ----------------------------------------------------------------------------------- Progressive Distillation
@pytest.mark.parametrize("t,t_next", [(999, 499), (749, 499), (499, -1), (249, -1)])
def test_progressive_target_makes_one_ddim_step_land_where_the_teachers_two_do(t, t_next):
    torch.manual_seed(0)
    z_t = torch.randn(SHAPE)
    z_next = torch.randn(SHAPE)  # any end point: x̃ is defined by the one-step landing property
    x_target = progressive_target(z_t, z_next, t, t_next, SCHEDULE)
    assert torch.allclose(ddim_step(x_target, z_t, t, t_next, SCHEDULE), z_next, atol=1e-4)


def test_round_step_counts_halve_from_start_to_end():
    assert round_step_counts(32, 1) == [32, 16, 8, 4, 2, 1]
    assert round_step_counts(8, 2) == [8, 4, 2]


def test_teacher_grid_starts_each_student_step_where_the_student_does():
    student, teacher = pd_timesteps(4)
    assert teacher[::2] == student and len(teacher) == 8


def two_teacher_steps_in_one(num_steps):
    """The exact student: the x0 for which one DDIM step lands on the teacher's two, found without the loop."""
    student_grid, teacher_grid = ddim_timesteps(num_steps), ddim_timesteps(2 * num_steps)

    def exact(z_t, t):
        t = int(t[0])
        i = student_grid.index(t)
        t_mid = teacher_grid[2 * i + 1]
        t_next = student_grid[i + 1] if i + 1 < num_steps else -1
        z_mid = ddim_step(analytic_teacher(z_t, t), z_t, t, t_mid, SCHEDULE)
        z_next = ddim_step(analytic_teacher(z_mid, t_mid), z_mid, t_mid, t_next, SCHEDULE)
        a_t, s_t = SCHEDULE.coefficients(t, z_t)
        a_n, s_n = SCHEDULE.coefficients(t_next, z_t)
        # Solve z_next = a_n·x + s_n·(z_t − a_t·x)/s_t for x (the DDIM step written out, not progressive_target).
        return (z_next - s_n / s_t * z_t) / (a_n - s_n / s_t * a_t)

    return exact


def pd_loss_of(student, num_steps=4, step_index=1, perturbation=0.0, weighting="truncated_snr"):
    networks = StandInNetworks(student)
    with torch.no_grad():
        networks.offset.fill_(perturbation)
    loop = ProgressiveLoop(networks, torch.optim.SGD([networks.offset], lr=0.0), [num_steps], 10, weighting=weighting)
    batch = ProgressiveBatch(x0=torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), cond=None)
    loss, _ = loop.progressive_loss(batch, step_index)
    return float(loss.detach())


@pytest.mark.parametrize("step_index", [0, 1, 3])
def test_pd_student_that_reproduces_the_teachers_two_steps_has_zero_loss(step_index):
    assert pd_loss_of(two_teacher_steps_in_one(4), step_index=step_index) < 1e-8


@pytest.mark.parametrize("step_index", [0, 1, 3])
def test_perturbed_pd_student_has_positive_loss(step_index):
    assert pd_loss_of(two_teacher_steps_in_one(4), step_index=step_index, perturbation=0.05) > 1e-4


def test_the_pd_loop_weighs_its_loss_as_configured():
    # At t = 999 (step 0 of 4) SNR < 1: the paper's weight is 1, the ε weighting's is SNR_999.
    alpha_bar = float(SCHEDULE.alphas_cumprod[999])
    paper = pd_loss_of(two_teacher_steps_in_one(4), step_index=0, perturbation=0.05)
    eps = pd_loss_of(two_teacher_steps_in_one(4), step_index=0, perturbation=0.05, weighting="eps")
    assert eps == pytest.approx(paper * alpha_bar / (1 - alpha_bar), rel=1e-4)


def test_pd_backward_runs_with_the_generator_active_and_trains_only_it():
    networks = StandInNetworks(lambda x_t, t: torch.zeros_like(x_t))
    loop = ProgressiveLoop(networks, torch.optim.SGD([networks.offset], lr=0.1), [2], 10)
    batch = ProgressiveBatch(x0=torch.randn(SHAPE), cond=None)
    metrics = loop.train_step(batch)
    assert networks.active == ["generator"]
    assert networks.offset.abs().sum() > 0 and networks.previous.grad is None
    assert metrics["loss_pd"] > 0


# ----------------------------------------------------------------------------------- DMD regression
def test_dmd_regression_gradient_points_at_the_pair_target():
    """−∂L_reg/∂G(z) per sample is parallel to y − G(z): descending moves the generator's output onto the pair."""
    torch.manual_seed(0)
    networks = StandInNetworks(lambda x_t, t: torch.zeros_like(x_t))
    networks.fake_score_parameters = lambda: []
    loop = DMDLoop(
        networks, torch.optim.SGD([networks.offset], lr=0.0), torch.optim.SGD([networks.previous], lr=0.0),
        DMD2LoopConfig(student_timesteps=[999], use_fake_score=False),
        regression_weight=1.0, init_regression_steps=0, regression_kind="pseudo_huber",
    )  # fmt: skip
    target = torch.randn(1, *SHAPE[1:])
    batch = DMDBatch(shape=(1, *SHAPE[1:]), pair_noise=torch.randn(1, *SHAPE[1:]), pair_target=target)
    finite, metrics = loop._regression_backward(batch, weight=1.0)
    assert finite and metrics["loss_reg"] > 0
    step = -networks.offset.grad.flatten()
    toward = (target - 0.0).flatten()  # G(z) = offset = 0
    cosine = float(step @ toward / (step.norm() * toward.norm()))
    assert cosine > 0.9999
    assert networks.active == ["generator"]


def test_dmd_warm_start_iterations_are_regression_only():
    networks = StandInNetworks(lambda x_t, t: torch.zeros_like(x_t))
    networks.fake_score_parameters = lambda: []
    loop = DMDLoop(
        networks, torch.optim.SGD([networks.offset], lr=0.1), torch.optim.SGD([networks.previous], lr=0.0),
        DMD2LoopConfig(student_timesteps=[999], use_fake_score=False, dfake_gen_update_ratio=10),
        regression_weight=0.0, init_regression_steps=1, regression_kind="l2",
    )  # fmt: skip
    batch = DMDBatch(shape=(1, *SHAPE[1:]), pair_noise=torch.randn(1, *SHAPE[1:]), pair_target=torch.ones(1, *SHAPE[1:]))
    first = loop.train_step(batch)
    assert "loss_reg" in first and "loss_dm" not in first
    assert loop.is_generator_turn() is False  # after the warm start, DMD2's ratio decides again


# ----------------------------------------------------------------------------------- the pair cache
LATENT = (2, 4, 4)


def make_pairs(directory, num_pairs, manifest=None, after_shard=None, shard_size=4):
    manifest = manifest or {"teacher": "t", "guidance_scale": 1.75, "resolution": 32, "pair_steps": 3, "seed": 5}
    ensure_teacher_pairs(
        directory, manifest, num_pairs, lambda x, t, idx: analytic_teacher(x, t) + idx.view(-1, 1, 1, 1) * 0.01,
        SCHEDULE, LATENT, num_prompts=3, shard_size=shard_size, after_shard=after_shard, show_progress=False,
    )  # fmt: skip


def test_interrupted_pair_generation_resumes_without_duplicating_or_skipping(tmp_path):
    make_pairs(tmp_path / "whole", 10)

    def interrupt(done):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_pairs(tmp_path / "resumed", 10, after_shard=interrupt)
    assert len(list((tmp_path / "resumed").glob("pairs-*.safetensors"))) == 1
    made = []
    make_pairs(tmp_path / "resumed", 10, after_shard=made.append)
    assert made == [8, 10]  # only the two missing shards were made
    whole, resumed = load_teacher_pairs(tmp_path / "whole", 10, 4), load_teacher_pairs(tmp_path / "resumed", 10, 4)
    assert len(resumed) == 10
    assert torch.equal(whole.noise, resumed.noise) and torch.equal(whole.target, resumed.target)
    assert torch.equal(resumed.prompt_index, torch.arange(10) % 3)
    assert len({tuple(n.flatten()[:4].tolist()) for n in resumed.noise}) == 10  # no pair repeated


def test_pairs_made_for_another_cfg_are_refused(tmp_path):
    make_pairs(tmp_path / "pairs", 4)
    other = {"teacher": "t", "guidance_scale": 3.0, "resolution": 32, "pair_steps": 3, "seed": 5}
    with pytest.raises(PairCacheMismatch, match="guidance_scale: cached 1.75, this run 3.0"):
        make_pairs(tmp_path / "pairs", 4, manifest=other)
    assert json.loads((tmp_path / "pairs" / "manifest.json").read_text())["guidance_scale"] == 1.75
