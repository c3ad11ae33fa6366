"""Kronecker-factored natural gradient: KFAC (:mod:`.kfac`) and SINGD (:mod:`.singd`) with its
structured factors (:mod:`.structures`); the plumbing they share is in :mod:`.kronecker`.
Their public names are exported by :mod:`funcopt` (``fo.kfac``, ``fo.scale_by_singd`` ...).

Both precondition the gradient of every supported layer (Linear, Conv2d; see
:func:`funcopt.func.supported_layers`) with two Kronecker factors built from the layer inputs
``a`` and output gradients ``g`` that :func:`funcopt.func.capture_curvature` returns. The
captured statistics travel to ``update`` as the extra keyword ``curvature``::

    import torch, funcopt as fo
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = fo.singd(model, learning_rate=1e-2)
    state = tx.init(params)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        cap = fo.func.capture_curvature(model, params, x, y)
        updates, state = tx.update(cap.grads, state, params, curvature=cap)
        params = fo.apply_updates(params, updates)

The parameter trees are dicts keyed like ``model.named_parameters()``. Parameters of other
layers go to a ``fallback`` transform (through :func:`funcopt.partition`); without one, a
model that has such parameters is refused with an error naming them.

Gradient accumulation: under :func:`funcopt.multi_steps`, pass the curvature of all the
micro-batches so far, ``fo.func.merge_curvature([...])``; the step then equals one step on the
concatenated batch (tested). Data parallel: give ``process_group``; the factor statistics are
averaged over it (average the gradients yourself, e.g. ``fo.tree_all_reduce_mean``). Mixed
precision: ``capture_curvature(..., loss_scale=s)`` scales the loss and unscales the results.

Host syncs: see each method's module.

vmap: ``update`` batches over independent problems of one architecture (a leading dimension
on the gradients, the state and the curvature's ``a``/``g``; ``num_loss_terms`` is a number,
``in_dims`` None). The model given at construction only names the layers and their sizes.
"""
