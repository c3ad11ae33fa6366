"""Compiled optimizer steps contain no host synchronisation.

A step under ``torch.compile`` must stay on the device: a ``.item()`` in Inductor's generated
code stalls the host on every step (on a GPU, a full device synchronisation). Some ``_foreach``
ops with a 0-d tensor operand (add, sub, maximum, pow) are traced into ``.item()``; the
transforms avoid them. This checks the generated code of each element-wise optimizer's pure
step, with a scheduled learning rate, and that the compiled numbers equal eager ones.
"""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import funcopt as fo

LR = fo.schedules.warmup_cosine_decay(0.0, 1e-2, 2, 20)

OPTIMIZERS = {
    "adamw": lambda: fo.adamw(LR, weight_decay=1e-2),
    "adam-nesterov-amsgrad": lambda: fo.chain(fo.scale_by_adam(nesterov=True),
                                              fo.scale_by_adam(amsgrad=True),
                                              fo.scale_by_learning_rate(LR)),
    "nadam": lambda: fo.nadam(LR),
    "sgd-nesterov": lambda: fo.sgd(LR, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "lion": lambda: fo.lion(LR, weight_decay=1e-2),
    "laprop": lambda: fo.laprop(LR),
    "adopt": lambda: fo.adopt(LR),
    "rmsprop-adagrad": lambda: fo.chain(fo.scale_by_rms(), fo.scale_by_learning_rate(LR)),
    "schedule-free-adamw": lambda: fo.schedule_free_adamw(1e-2, warmup_steps=2),
    "clip-adamw": lambda: fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(LR)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_has_no_host_sync(name):
    torch._dynamo.reset()
    tx = OPTIMIZERS[name]()

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fo.apply_updates(params, updates), state

    gen = torch.Generator().manual_seed(0)
    params = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen) for _ in range(3)]
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    p_e, s_e = params, tx.init(params)
    p_c, s_c = params, tx.init(params)
    codes = []
    for g in grads:
        p_e, s_e = step(p_e, s_e, g)
        (p_c, s_c), code = run_and_get_code(compiled, p_c, s_c, g)
        codes += code
    assert codes, "Inductor generated no code: the step did not compile"
    for code in codes:
        assert ".item()" not in code and "_local_scalar_dense" not in code, \
            f"{name}: the compiled step reads a device scalar on the host"
    torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)


def test_replace_is_namedtuple_replace_and_traces():
    """``base.replace`` equals ``_replace``, names unknown fields, and compiles to a full tuple
    (Dynamo in torch 2.11 returned an empty tuple from a compiled ``_replace``)."""
    from funcopt.base import replace
    from funcopt.transforms.first_order import ScaleByAdamState

    s = ScaleByAdamState(torch.zeros((), dtype=torch.int64), [torch.ones(3)], [torch.ones(3)])
    r = replace(s, count=s.count + 1)
    assert type(r) is ScaleByAdamState and r.count == 1 and r.mu is s.mu and r.nu is s.nu
    with pytest.raises(TypeError, match="no field"):
        replace(s, mean=1)
    out = torch.compile(lambda st: replace(st, count=st.count + 1), fullgraph=True,
                        backend="aot_eager")(s)
    assert type(out) is ScaleByAdamState and len(out) == 3 and int(out.count) == 1


def _pow_in_element_loops(code: str) -> bool:
    """Whether a ``pow`` sits inside one of the C++ kernels' element loops."""
    for loop in code.split("for(int64_t x0")[1:]:
        body = loop.split("#pragma omp single")[0].split("''')")[0]
        if "pow(" in body or "expm1(" in body:  # 1 - b**t, or its -expm1(t log b) form
            return True
    return False


def test_compiled_adam_computes_its_bias_correction_once(monkeypatch):
    """The bias correction ``1 - beta**t`` is computed once per step, not once per element of
    the update kernel (``engine.per_step``). The check is shown to catch the regression by
    turning ``per_step`` off."""
    import funcopt.engine as engine
    import funcopt.transforms.first_order as first_order

    def codes():
        torch._dynamo.reset()
        tx = fo.adamw(1e-3, weight_decay=1e-2)
        p = torch.randn(1024)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return fo.apply_updates(params, updates), state

        _, code = run_and_get_code(torch.compile(step, fullgraph=True), p, tx.init(p),
                                   torch.randn(1024))
        return "\n".join(code)

    code = codes()
    assert "cpp_fused" in code and not _pow_in_element_loops(code)
    for module in (engine, first_order):
        monkeypatch.setattr(module, "per_step", lambda x: x)
    assert _pow_in_element_loops(codes())
