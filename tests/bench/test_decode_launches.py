"""bench/decode_launches.py: one Triton launch counts once (the interpreter's own ops left out),
and the per layer-step rates of a hand-made log."""

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from decode_launches import InterpretedFunction, LaunchLog, _counted_run, summarize

from kvloft.kernels.rms_norm import rms_norm_unchecked


def _logged(fn) -> Counter:
    log = LaunchLog()
    real, run = _counted_run(log)
    InterpretedFunction.run = run
    try:
        with log:
            fn()
    finally:
        InterpretedFunction.run = real
    return Counter({op: n for (op, _, _), n in log.count.items()})


def test_a_launch_counts_once_without_the_interpreters_ops():
    x, w = torch.randn(5, 24), torch.randn(24)  # 5 programs, each running many interpreted ops
    ops = _logged(lambda: [rms_norm_unchecked(x, w, 1e-6, None) for _ in range(2)])
    assert ops["triton:_rms_norm_kernel"] == 2
    # the launcher's own allocation (one empty a call) and nothing the interpreter ran
    assert sum(ops.values()) - ops["triton:_rms_norm_kernel"] == 2
    assert set(ops) == {"triton:_rms_norm_kernel", "empty"}


def test_summarize_rates_by_part():
    log = LaunchLog()
    log.count.update({("mm", "a.py:1 f", "attend"): 12, ("triton:k", "b.py:2 g", "attend"): 6,
                      ("view", "a.py:3 f", "attend"): 24, ("linear", "c.py:4 h", "pre/post"): 6,
                      ("argmax", "d.py:5 s", "step"): 3, ("to(view)", "d.py:6 s", "step"): 3})
    r = summarize(log, "x", layers=2, steps=3, top=2)  # 6 layer-steps, 3 steps
    assert (r["attend_per_layer_step"], r["triton_attend_per_layer_step"]) == (3.0, 1.0)
    assert (r["prepost_per_layer_step"], r["layer_step"], r["views_per_layer_step"]) == (1.0, 4.0, 4.0)
    assert (r["per_step_outside_layers"], r["views_per_step_outside_layers"]) == (1.0, 1.0)
    assert r["top_sites_per_layer_step"] == {"a.py:1 f [mm]": 2.0, "b.py:2 g [triton:k]": 1.0}
