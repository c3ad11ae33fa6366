"""A first-order chain traces under torch.compile(fullgraph=True), gives eager's numbers and
does not recompile as the step counter and the scheduled learning rate change.

The per-leaf chain is traced with the ``aot_eager`` backend (the same Dynamo and AOT tracing
that decide graph breaks and recompiles, without generating C++ kernels: the costly part on a
CPU); the flattened chain runs the same transforms through Inductor's generated kernels."""

import pytest
import torch

import funcopt as fo
from funcopt.testing import assert_trees_close, random_like

NEEDED = ("clip_by_global_norm", "scale_by_adam", "add_decayed_weights", "scale_by_learning_rate")


def make_chain():
    missing = [n for n in NEEDED if not hasattr(fo, n)]
    if missing:
        pytest.skip(f"not available yet: {missing}")
    return fo.chain(
        fo.clip_by_global_norm(1.0),
        fo.scale_by_adam(),
        fo.add_decayed_weights(1e-2),
        fo.scale_by_learning_rate(fo.schedules.warmup_cosine(1e-2, 2, 20)),
    )


def make_params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g),
            "v": [torch.randn(3, generator=g), torch.randn((), generator=g)]}


@pytest.mark.parametrize("flat, backend", [(False, "aot_eager"), (True, "inductor")],
                         ids=["chain", "flatten"])
def test_compiled_chain_matches_eager(flat, backend):
    torch._dynamo.reset()
    tx = make_chain()
    if flat:
        tx = fo.flatten(tx)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fo.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)
    params = make_params()
    p_eager, s_eager = params, tx.init(params)
    p_comp, s_comp = params, tx.init(params)
    for i in range(5):
        grads = random_like(params, seed=10 + i, scale=3.0)
        p_eager, s_eager = step(p_eager, s_eager, grads)
        if i == 1:  # after the first call has compiled, any recompile is an error
            torch.compiler.set_stance("fail_on_recompile")
        try:
            p_comp, s_comp = compiled(p_comp, s_comp, grads)
        finally:
            torch.compiler.set_stance("default")
        assert_trees_close(p_comp, p_eager, rtol=1e-5, atol=1e-6, what=f"params at step {i}")
        assert_trees_close(s_comp, s_eager, rtol=1e-5, atol=1e-6, what=f"state at step {i}")
    # the run really moved the parameters (the learning rate warmed up from 0)
    assert not torch.allclose(p_comp["w"], params["w"])
