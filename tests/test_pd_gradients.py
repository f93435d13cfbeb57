"""The PD gradient measurement's summary (the run itself: ``python -m fewstep.benchmarks.pd_gradients``)."""

import pytest

from fewstep.benchmarks.pd_gradients import format_table, summarise
from fewstep.core.schedule import SD_TRAINING_SCHEDULE, NoiseSchedule

SCHEDULE = NoiseSchedule.from_config(SD_TRAINING_SCHEDULE)


def test_the_eps_space_weight_is_214_at_t_999_and_1_at_t_249():
    records = [{"step_index": i, "grad_norm": 1.0, "loss": 1.0} for i in range(4)]
    rows = summarise(records, 4, SCHEDULE)
    assert [r["t"] for r in rows] == [999, 749, 499, 249]
    assert rows[0]["eps_weight"] == pytest.approx(213.6, abs=0.5) and rows[3]["eps_weight"] == 1.0


def test_each_step_gets_its_share_of_the_summed_squared_gradient_norm():
    norms = {0: [3.0, 3.0], 1: [1.0], 3: [1.0]}  # step 2 never drawn: no row
    records = [{"step_index": i, "grad_norm": n, "loss": 0.5} for i, values in norms.items() for n in values]
    rows = summarise(records, 4, SCHEDULE)
    assert [r["t"] for r in rows] == [999, 749, 249]
    assert [r["squared_grad_share"] for r in rows] == pytest.approx([18 / 20, 1 / 20, 1 / 20])
    assert rows[0]["grad_norm"] == 3.0 and rows[0]["grad_norm_sd"] == 0.0 and rows[0]["iterations"] == 2
    table = format_table({"rows": rows, "num_steps": 4, "start_steps": 4, "batch_size": 32, "iterations": 4,
                          "seeds": [0]})  # fmt: skip
    assert len(table.splitlines()) == 2 + 3 + 1 and "the base with CFG" in table
