"""DMD2 proven on an exact teacher: a 2-D 8-mode ring whose denoiser is closed-form at every t.

The one-step run takes a few minutes on one core (15k iterations at batch 512); the others 10–30 s. Results are
printed (``pytest -s``) so the numbers in the issue notes can be reproduced; the same runs are available as
``fewstep demo --exact``.
"""

import pytest
import torch

from fewstep.core.metrics import kde_log_likelihood, manifold_metrics
from fewstep.toy.exact_teacher import (
    KDE_BANDWIDTH, ExactTeacherConfig, biased_student_distillpp, train_exact_teacher,
)  # fmt: skip
from fewstep.toy.gmm import GaussianMixture


def report(name, result):
    print(f"\n{name}: swd_student={result.swd_student:.4f} swd_teacher_50={result.swd_teacher_50:.4f} "
          f"floor={result.swd_data_floor:.4f} modes={result.modes_covered} fractions={result.mode_fractions} "
          f"within 2σ={result.within_2std} cross-entropy={result.cross_entropy} "
          f"coverage={ {k: round(v['coverage'], 3) for k, v in result.variety.items()} } ({result.seconds:.1f}s)")


@pytest.fixture(scope="module")
def one_step():
    result = train_exact_teacher(ExactTeacherConfig())
    report("one-step DMD2", result)
    return result


def test_one_step_student_covers_all_eight_modes(one_step):
    assert one_step.modes_covered == 8
    assert min(one_step.mode_fractions) >= 0.05


def test_one_step_student_is_within_1_5x_of_the_teachers_50_step_distance(one_step):
    assert one_step.swd_student <= 1.5 * one_step.swd_teacher_50


def test_one_step_student_puts_its_samples_on_the_modes_not_on_a_ring(one_step):
    # A ring through the modes passes SWD and a mode count; the exact density does not let it pass.
    assert one_step.within_2std["student"] >= 0.82  # data 0.866


def test_one_step_students_cross_entropy_is_within_5_percent_of_the_datas_entropy(one_step):
    # The reference is the data's own E[−log p_data] (its entropy): lower means samples packed onto the mode centres
    # (the 50-step DDIM teacher's 1.95 against the data's 2.13), higher means samples between the modes.
    student, data = one_step.cross_entropy["student"], one_step.cross_entropy["data"]
    assert abs(student - data) <= 0.05 * data


def test_one_step_students_coverage_of_the_data_is_within_10_percent_of_the_teachers(one_step):
    # Within-mode variety: streaks inside the modes pass the two tests above but leave the data's k-NN balls empty.
    assert one_step.coverage_ratio() >= 0.9
    assert one_step.variety["data"]["coverage"] > 0.9  # a second data draw: the best any sampler can score
    # The data's log-likelihood under a density estimate on the samples: the student's within 0.3 nats of the
    # teacher's (the old default's student: 0.44 below; measured 0.20 below).
    student, teacher = (one_step.variety[k]["data_log_likelihood"] for k in ("student", "teacher_50"))
    assert student > teacher - 0.3


def test_a_streaky_sampler_passes_the_fidelity_count_but_not_coverage():
    # Every mode's samples squashed onto a line (std 0.025 across it): more of them lie within 2σ of a mode than the
    # data's own, yet most of the data's k-NN balls away from the lines hold no sample.
    mixture = GaussianMixture.ring(std=ExactTeacherConfig.mode_std)
    data, other = (mixture.sample(4000, torch.Generator().manual_seed(seed)) for seed in (0, 1))
    generator = torch.Generator().manual_seed(2)
    modes = torch.randint(len(mixture.means), (4000,), generator=generator)
    across = torch.tensor([1.0, 0.1], dtype=torch.float64)
    noise = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    streaks = (mixture.means[modes] + mixture.std * noise * across).float()
    assert mixture.fraction_within(streaks) > mixture.fraction_within(other)
    assert manifold_metrics(data, streaks)["coverage"] < 0.5 < 0.9 < manifold_metrics(data, other)["coverage"]
    # The data between the lines is unlikely under a density estimate on the streaky samples (−10.6 against −2.3).
    streaky_fit, matching_fit = (kde_log_likelihood(x, data, KDE_BANDWIDTH) for x in (streaks, other))
    assert streaky_fit < matching_fit - 5


def test_without_the_fake_score_the_student_collapses(one_step):
    # DMD Fig. 3: the real score alone is mode-seeking; with the same budget the samples leave most modes.
    result = train_exact_teacher(
        ExactTeacherConfig(use_fake_score=False, iterations=3000, dfake_gen_update_ratio=10, batch_size=256)
    )
    report("real score only", result)
    assert result.modes_covered < one_step.modes_covered
    assert result.swd_student > 3 * one_step.swd_student


def test_four_step_students_with_and_without_backward_simulation_both_cover_all_modes():
    # Measured (6000 iterations, batch 256): SWD 0.19 with backward simulation, 0.12 with noised real inputs. With an
    # exact teacher the noised-real inputs at t_k ARE the marginals a perfect student meets, so the mismatch DMD2's
    # backward simulation removes barely exists here, while it splits the budget with its own early steps.
    # What we can justify on this toy: both train a multi-step student that covers every mode.
    four_step = dict(num_steps=4, iterations=4000, dfake_gen_update_ratio=10, batch_size=256)
    with_bs = train_exact_teacher(ExactTeacherConfig(**four_step))
    without_bs = train_exact_teacher(ExactTeacherConfig(**four_step, backward_simulation=False))
    report("4-step, backward simulation", with_bs)
    report("4-step, noised real inputs", without_bs)
    for result in (with_bs, without_bs):
        assert result.modes_covered == 8
        assert result.swd_student < 0.5


def test_distillpp_moves_a_biased_student_toward_the_data_monotonically_in_lambda():
    lams = [0.0, 0.1, 0.2, 0.3, 0.4]
    distances = biased_student_distillpp(lams)
    print("\nDistillation++ SWD by λ:", {k: round(v, 4) for k, v in distances.items()})
    values = [distances[lam] for lam in lams]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_distillpp_on_the_first_two_of_four_steps_helps_a_biased_student():
    distances = biased_student_distillpp([0.0, 0.5], guided_steps=2)
    assert distances[0.5] < distances[0.0]


def test_density_metrics_of_the_data_are_the_closed_form_values(one_step):
    # Within 2σ of a 2-D isotropic Gaussian: 1 − e^(−2) ≈ 0.865; E[−log p] of the ring ≈ the entropy of one mode
    # (1 + log 2πs²) + log 8 for well-separated modes.
    import math

    assert abs(one_step.within_2std["data"] - (1 - math.exp(-2))) < 0.02
    entropy = 1 + math.log(2 * math.pi * 0.25**2) + math.log(8)
    assert abs(one_step.cross_entropy["data"] - entropy) < 0.05
