"""The learning-rate grid grows past an end that wins (at most ``suite.EXTEND`` points, the same
rule for every optimizer), and the report shows those points; and the images of the CNN
problems: the small problem's data is the one it always had, the harder set is fixed."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from funcopt.bench import deep, suite
from funcopt.bench.load import from_json
from funcopt.bench.report import sweep_table
from funcopt.bench.run import Result

FULL = suite.GRIDS["full"]
STEP = 10 ** 0.5  # the grids' multiplier step


def _fake_runs(val):
    """A run function for ``suite._tune``: the run at ``lr`` ends at validation loss
    ``val(lr)`` (None: the run failed); records every rate it was asked for."""
    asked: list[float] = []

    def run(lr: float) -> Result:
        asked.append(lr)
        v = val(lr)
        if v is None:
            return Result("p", "o", "failed", reason="diverged", learning_rate=lr)
        return Result("p", "o", "ok", learning_rate=lr, final_val={"loss": v})

    return run, asked


def _tune(val, lr0=1e-3, grid=FULL):
    run, asked = _fake_runs(val)
    best, sweep = suite._tune(run(lr0), grid, run)
    return best, sweep, asked[1:]  # the default's run is made by the caller


def test_an_interior_optimum_adds_no_point():
    best, s, asked = _tune(lambda lr: math.log10(lr / 3e-3) ** 2)  # optimum at 3x the default
    assert asked == pytest.approx([1e-4, 10 ** -3.5, 10 ** -2.5, 1e-2])  # the grid, no more
    assert s.learning_rates == pytest.approx([1e-3 * m for m in FULL])
    assert s.beyond == [] and s.edge == "" and s.chosen == pytest.approx(10 ** -2.5)
    assert best.learning_rate == s.chosen


@pytest.mark.parametrize("side", ["lower", "upper"])
def test_the_extension_finds_an_optimum_one_step_past_the_end(side):
    sign = -1 if side == "lower" else 1
    opt = 1e-3 * 10 ** (sign * 1.5)  # 0.0316x or 31.6x the default: one step past the grid
    best, s, asked = _tune(lambda lr: math.log10(lr / opt) ** 2)
    # the grid, then the winning end's next point (the optimum), then one more to bracket it
    assert asked[4:] == pytest.approx([opt, opt * STEP ** sign])
    assert s.chosen == pytest.approx(opt) and best.learning_rate == s.chosen
    assert s.edge == "" and s.beyond == pytest.approx(asked[4:])
    assert s.learning_rates == sorted(s.learning_rates) and len(s.learning_rates) == 7
    assert np.allclose(np.diff(np.log10(s.learning_rates)), 0.5)  # the same half-decade step
    assert len(s.val_loss) == 7 and min(s.val_loss) == pytest.approx(0.0, abs=1e-20)


def test_the_extension_stops_after_two_points_and_then_notes_the_edge():
    best, s, asked = _tune(lambda lr: math.log10(lr))  # smaller is always better
    assert len(asked) == 4 + suite.EXTEND == 6
    assert s.beyond == pytest.approx([1e-3 * 0.1 / STEP, 1e-3 * 0.1 / STEP ** 2])
    assert s.chosen == pytest.approx(1e-3 * 0.01) and s.edge == "lower"
    assert s.learning_rates[0] == s.chosen and best.learning_rate == s.chosen
    (note,) = suite.notes([], [s])
    assert "grid's lower end, also after 2 rates beyond it" in note


def test_a_failed_point_past_the_end_brackets_the_choice():
    # the largest grid rate wins and the next one diverges: the choice is bracketed
    best, s, asked = _tune(lambda lr: None if lr > 0.011 else -lr)
    assert len(asked) == 5 and s.beyond == pytest.approx([1e-3 * 10 * STEP])
    assert s.val_loss[-1] is None and s.chosen == pytest.approx(1e-2) and s.edge == ""


def test_every_failure_chooses_nothing_and_extends_nothing():
    best, s, asked = _tune(lambda lr: None)
    assert len(asked) == 4 and s.beyond == [] and s.chosen is None
    assert best.status == "failed" and "every learning rate of the sweep failed" in best.reason


def test_the_quick_grid_extends_by_the_same_rule():
    _, s, asked = _tune(lambda lr: math.log10(lr / 1e-2) ** 2, grid=suite.GRIDS["quick"])
    assert s.beyond == pytest.approx([1e-3 * 10, 1e-3 * 10 * STEP])  # 10x wins, 31.6x brackets
    assert s.chosen == pytest.approx(1e-2) and s.edge == ""


def test_the_sweep_table_marks_the_points_beyond_the_grid():
    _, s, _ = _tune(lambda lr: math.log10(lr))
    table = sweep_table([s])
    assert table.count("(+)") == 2 and "(lower edge)" in table
    assert "**1e-05 (+): " in table and "0.0001: " in table and "0.0001 (+)" not in table
    _, s, _ = _tune(lambda lr: math.log10(lr / 3e-3) ** 2)
    table = sweep_table([s])
    assert "(+)" not in table and "edge" not in table


def test_a_sweep_from_a_report_before_the_extension_still_loads():
    _, s, _ = _tune(lambda lr: math.log10(lr))
    data = s.to_json()
    assert from_json(suite.Sweep, data, "sweeps[0]") == s
    del data["beyond"]  # written before the field existed
    old = from_json(suite.Sweep, data, "sweeps[0]")
    assert old.beyond == [] and old.learning_rates == s.learning_rates
    del data["val_loss"]
    with pytest.raises(ValueError, match="has no field 'val_loss'"):
        from_json(suite.Sweep, data, "sweeps[0]")


def test_lions_default_is_below_adamws():
    from funcopt.bench.optimizers import LEARNING_RATES

    assert LEARNING_RATES["lion"] == 1e-3 and LEARNING_RATES["adamw"] == 3e-3


# ----------------------------------------------------------------------------- images

# sha256 of shapes_images(1280) (the small cifar-cnn problem's 512 + 256 + 512 images) as the
# generator was before the harder set was added: its labels exactly; its pixels through
# float64 sums, since the last bit of a float32 sine may differ between CPU instruction sets
SMALL_LABELS_SHA256 = "48247b64db33b7f93b73ea81b1b561c22e9c4f218b9645baca37f571ebbf71c7"
SMALL_PIXEL_SUMS = (-0.04652063226558312, 3932159.0404156633, -1484.6231572503802,
                    32546.9889308743)
SMALL_PIXELS = (-0.37492087483406067, 0.28184035420417786, 1.8932067155838013,
                1.3948073387145996)


def _sums(x: torch.Tensor) -> tuple[float, ...]:
    xd = x.double().flatten(1)
    w = torch.linspace(-1, 1, xd.shape[1], dtype=torch.float64)
    return (float(xd.sum()), float(xd.pow(2).sum()), float((xd @ w).sum()),
            float(xd[:, ::97].abs().sum()))


def test_the_small_problems_images_are_unchanged():
    x, y = deep.shapes_images(1280)
    assert x.shape == (1280, 3, 32, 32) and x.dtype == torch.float32
    assert hashlib.sha256(y.numpy().tobytes()).hexdigest() == SMALL_LABELS_SHA256
    # a changed draw moves these sums by orders more than rounding (sum of x^2 is 3.9e6)
    assert _sums(x) == pytest.approx(SMALL_PIXEL_SUMS, rel=1e-9, abs=1e-6)
    assert x.flatten()[[0, 1000, 123456, 3000000]].tolist() == pytest.approx(SMALL_PIXELS, abs=1e-6)


def test_the_hard_images_are_fixed_and_differ_from_the_easy_ones():
    x1, y1 = deep.hard_shapes_images(300, seed=5)
    deep.hard_shapes_images.cache_clear()
    x2, y2 = deep.hard_shapes_images(300, seed=5)
    assert x1.shape == (300, 3, 32, 32) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1.tolist()) == set(range(10))
    assert float(x1.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x1.std()) == pytest.approx(1.0, abs=1e-5)
    x3, _ = deep.hard_shapes_images(300, seed=6)
    assert not torch.allclose(x1, x3)
    xe, ye = deep.shapes_images(300, seed=5)
    assert not torch.allclose(x1, xe)
