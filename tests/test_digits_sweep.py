"""The digits sweep's command line: variants and Distillation++ settings parse to typed settings or one clear error."""

import pytest

from fewstep.benchmarks.digits_sweep import format_summary, parse_distillpp, parse_variant, student_row, summarise


def test_variant_parses_to_typed_demo_settings():
    assert parse_variant("fake rank 64:fake_rank=64,lr=1e-4") == ("fake rank 64", {"fake_rank": 64, "lr": 1e-4})
    assert parse_variant("long 4-step:num_steps=4,max_steps=1200") == ("long 4-step", {"num_steps": 4, "max_steps": 1200})


def test_a_variant_may_name_another_method_and_its_options():
    assert parse_variant("PD eps:method=progressive,pd_weighting=eps") == (
        "PD eps", {"method": "progressive", "pd_weighting": "eps"}
    )  # fmt: skip
    with pytest.raises(SystemExit, match="variant 'x': unknown method 'pd'"):
        parse_variant("x:method=pd")


def test_unknown_variant_setting_is_refused_naming_the_known_ones():
    with pytest.raises(SystemExit, match="unknown setting 'steps'.*num_steps"):
        parse_variant("x:steps=4")


def test_distillpp_setting_parses_to_typed_fields():
    name, settings = parse_distillpp("eps cfg4:rule=eps_mix,lam=0.02,guided_steps=2,teacher_guidance_scale=4")
    assert name == "eps cfg4"
    assert settings == {"rule": "eps_mix", "lam": 0.02, "guided_steps": 2, "teacher_guidance_scale": 4.0}


@pytest.mark.parametrize(
    "text, message",
    [("x:lambda=0.1", "unknown setting 'lambda'"), ("x:rule=sds", "rule must be one of"), ("x:lam=1.5", "λ must be in")],
)
def test_bad_distillpp_setting_is_refused_with_its_reason(text, message):
    with pytest.raises(SystemExit, match=message):
        parse_distillpp(text)


def test_one_step_students_keep_the_earlier_sweeps_row_and_others_use_their_recipe():
    assert student_row(1) == "student_1" and student_row(4) == "student"


def _result(variant, seed, fd, recall=None):
    variety = {} if recall is None else dict(precision=0.9, recall=recall, density=1.0, coverage=0.8)
    return dict(variant=variant, seed=seed, fd=fd, acc=0.99, seconds=1.0, train_seconds=60.0, **variety)


def test_summary_gives_mean_and_sd_of_recall_and_coverage():
    summary = summarise([_result("demo", 0, 80.0, recall=0.6), _result("demo", 1, 90.0, recall=0.8)])
    assert summary["demo"]["recall_mean"] == pytest.approx(0.7)
    assert summary["demo"]["recall_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["demo"]["coverage_mean"] == pytest.approx(0.8) and summary["demo"]["fd_mean"] == pytest.approx(85.0)
    line = format_summary(summary, n=2000).splitlines()[-1]
    assert "85.00 ± 7.07" in line and "0.70 ± 0.14" in line and "0.80 ± 0.00" in line


def test_summary_of_results_from_before_the_variety_scores_prints_a_dash():
    summary = summarise([_result("old", 0, 80.0), _result("old", 1, 90.0, recall=0.8)])  # one seed lacks them
    assert "recall_mean" not in summary["old"] and summary["old"]["fd_mean"] == pytest.approx(85.0)
    assert format_summary(summary, n=2000).splitlines()[-1].count("—") == 2
