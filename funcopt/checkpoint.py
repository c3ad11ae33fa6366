"""Checkpoints for functional training loops: params + optimizer state + RNG, bit-identical.

A functional loop keeps everything that decides its future in three places: the parameter
pytree, the optimizer state pytree and the random number generators. :func:`save_checkpoint`
writes all three; :func:`load_checkpoint` restores them, so the resumed loop produces exactly
the same numbers as the uninterrupted one::

    state = tx.init(params)
    for step in range(start, n_steps):
        ...
        if step % 100 == 0:
            fo.save_checkpoint("ckpt.pt", params, state, step=step)

    # later, in a fresh process
    params = init_params()                       # any values, the right structure
    ckpt = fo.load_checkpoint("ckpt.pt", params, tx.init(params))
    params, state, start = ckpt.params, ckpt.opt_state, ckpt.step + 1

Files hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(path, weights_only=True)``. Each file carries a format number and a SHA-256 of its
content; :func:`load_checkpoint` checks both, so a truncated, empty, altered or foreign file is
one ``ValueError`` naming the file and what is wrong, never a silent wrong state. Pytree structure (NamedTuple state classes, dict keys)
is not pickled: the caller passes templates of the right structure (a fresh ``tx.init(params)``)
and the stored structure is checked against them, so a checkpoint from a different transform or
model shape is refused with an error that says what differs.

Hyperparameters held in the state (the ``learning_rate`` field of
:func:`funcopt.scale_by_learning_rate`, ``inject_hyperparams``' ``hyperparams``: the fields
declared with :func:`funcopt.register_hyperparameters`) are taken from the template by default,
so a transform rebuilt with a new learning rate resumes with it; see :func:`load_checkpoint`.

Bit-identical continuation also needs the data order to be a function of the step (or of the
restored RNG) and deterministic kernels (``torch.use_deterministic_algorithms(True)`` on GPUs).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import random
import re
import zipfile
from typing import Any, NamedTuple

import numpy as np
import optree
import torch

from funcopt.base import (
    PyTree,
    holds_schedule_value,
    hyperparameter_fields,
    tree_flatten,
    tree_flatten_tensors,
    tree_unflatten,
)

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "tree_to_state_dict",
    "tree_from_state_dict",
    "get_rng_state",
    "set_rng_state",
]

_FORMAT = 2  # 2: adds "sha256"; 1 (no checksum) is still read
_READABLE = (1, 2)
_KEYS = ("params", "opt_state", "step", "extra")
# what ``torch.load(..., weights_only=True)`` reads back (checked by exact type, not isinstance:
# a subclass such as a NamedTuple or a str Enum pickles its class, which such a load refuses)
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CONTAINERS = (list, tuple, dict, collections.OrderedDict, set, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def tree_to_state_dict(tree: PyTree) -> dict[str, Any]:
    """A ``weights_only``-loadable dict for a pytree of tensors.

    It holds the leaves, their shapes and dtypes, and the structure as text (used only to check
    a template on load; NamedTuple classes are never pickled).
    """
    leaves, treedef = tree_flatten_tensors(
        tree, "leaf %d of the tree",
        "store only tensors in params and optimizer state (use 0-d tensors for numbers)")
    return {
        "structure": str(treedef),
        "shapes": [list(x.shape) for x in leaves],
        "dtypes": [str(x.dtype) for x in leaves],
        "leaves": list(leaves),
    }


def tree_from_state_dict(sd: dict[str, Any], like: PyTree, what: str = "tree") -> PyTree:
    """Rebuild a pytree from :func:`tree_to_state_dict` output, in the structure of ``like``.

    Each leaf keeps the stored values and lands on the device of the matching leaf of ``like``.
    Raises a ValueError naming the difference when the structure, a shape or a dtype differs,
    or when ``sd`` is not such a dict (no ``structure``/``leaves``, a leaf that is not a
    tensor, more or fewer leaves than the structure holds: a corrupted or edited file).
    """
    return _from_state_dict(sd, like, what)


def _from_state_dict(sd: Any, like: PyTree, what: str, hyperparams: str | None = None) -> PyTree:
    """:func:`tree_from_state_dict`; with ``hyperparams`` (``"template"`` or ``"saved"``, for
    an optimizer state) the leaves of declared hyperparameter fields of ``like`` are named in
    errors, and with ``"template"`` they come from ``like`` (:func:`_template_value`) without
    comparing the saved leaf's shape and dtype: it must only exist, in the same structure."""
    leaves_like, treedef = tree_flatten(like)
    _check_stored(sd, what)
    if sd.get("structure") != str(treedef):
        raise ValueError(
            f"the saved {what} does not match the template: it was saved from a different "
            f"transform or model.\n  saved:    {sd.get('structure')}\n  template: {treedef}\n"
            "Build the template with the same transform and parameters that wrote it."
        )
    stored = sd["leaves"]
    if len(stored) != len(leaves_like):
        raise ValueError(f"the saved {what} holds {len(stored)} leaves but its structure (and "
                         f"the template) has {len(leaves_like)}; it is corrupted: pass the "
                         f"saved {what} as tree_to_state_dict / state_dict() wrote it")
    names = _hyperparameter_names(like) if hyperparams else [""] * len(stored)
    out = []
    for i, (x, ref, name) in enumerate(zip(stored, leaves_like, names)):
        if name and hyperparams == "template":
            out.append(_template_value(x, ref))
            continue
        if tuple(x.shape) != tuple(ref.shape) or x.dtype != ref.dtype:
            found = (f"the saved {what} leaf {i}{f' (hyperparameter {name})' if name else ''} "
                     f"has shape {tuple(x.shape)} and dtype {x.dtype}, but the template has "
                     f"{tuple(ref.shape)} and {ref.dtype}; ")
            if name:
                raise ValueError(found + "hyperparams='saved' keeps the saved value, so the "
                                 "template must match it: pass hyperparams='template' to take "
                                 "the transform's own value, or build the transform with the "
                                 "saved dtype (e.g. inject_hyperparams(..., hyperparam_dtype=...))")
            raise ValueError(found + "the parameters changed shape or dtype since it was saved. "
                             "Load it into a model of the saved shape.")
        out.append(x.to(ref.device))
    return tree_unflatten(treedef, out)


def _hyperparameter_names(tree: PyTree) -> list[str]:
    """For each leaf of ``tree`` (in :func:`tree_flatten` order): the name of the declared
    hyperparameter field that holds it (``"InjectHyperparamsState.hyperparams['lr']"``), or
    ``""``. Fields are found through NamedTuples, tuples, lists and dicts."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    names = []
    for path in paths:
        node, name = tree, ""
        for key in path:
            if name:  # inside a declared field: every leaf below is part of it
                name += f"[{key!r}]"
                continue
            if not isinstance(node, (tuple, list, dict)):
                break  # another registered pytree node: not searched
            if hasattr(node, "_fields") and node._fields[key] in hyperparameter_fields(node):
                name = f"{type(node).__name__}.{node._fields[key]}"
            node = node[key]
        names.append(name)
    return names


def _template_value(saved: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The value of a declared hyperparameter leaf in ``hyperparams="template"`` mode: a copy of
    the template's; but where the template's leaf records a schedule's value
    (:func:`funcopt.base.holds_schedule_value`: ``update`` evaluates the schedule
    and does not read it), the saved record, in the template's dtype and device, so the field
    reads the value of the last step until the next one."""
    if holds_schedule_value(template) and tuple(saved.shape) == tuple(template.shape) \
            and saved.is_floating_point() and template.is_floating_point():
        return saved.to(template.device, template.dtype)
    return template.detach().clone()


def _check_stored(sd: Any, what: str) -> None:
    """ValueError unless ``sd`` has the form :func:`tree_to_state_dict` writes: a dict with a
    ``structure`` string and a ``leaves`` list of tensors."""
    fix = f"pass the saved {what} as tree_to_state_dict / state_dict() wrote it"
    if not isinstance(sd, dict) or not isinstance(sd.get("structure"), str) \
            or not isinstance(sd.get("leaves"), list):
        raise ValueError(f"the saved {what} is not a dict with a 'structure' string and a "
                         f"'leaves' list (got {type(sd).__name__}"
                         f"{' with keys ' + str(sorted(map(str, sd))) if isinstance(sd, dict) else ''}"
                         f"); it is corrupted or not a saved tree: {fix}")
    stored = sd["leaves"]
    bad = next((i for i, x in enumerate(stored) if not isinstance(x, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"the saved {what} leaf {bad} is a {type(stored[bad]).__name__}, not a "
                         f"tensor; it is corrupted: {fix}")


def get_rng_state() -> dict[str, Any]:
    """The state of torch (CPU and every CUDA device), Python ``random`` and NumPy's global RNG."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    params: PyTree
    opt_state: PyTree
    step: int
    extra: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike[str],
    params: PyTree,
    opt_state: PyTree,
    *,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
) -> None:
    """Write ``params``, ``opt_state``, ``step``, ``extra`` and (``rng=True``) the RNG states.

    Args:
      path: file to write; written to ``path + ".tmp"`` first and renamed, so a crash while
        saving never leaves a truncated checkpoint behind.
      params: the parameter pytree (tensors).
      opt_state: the optimizer state pytree (tensors), as returned by ``update``.
      step: the step number to resume from (default 0).
      extra: anything else ``weights_only`` can load: None, bool, int, float, complex, str,
        bytes, tensors, ``torch.dtype``/``device``/``Size``, and lists, tuples, sets and dicts of
        these. Anything else (a dataclass, a NamedTuple, a NumPy scalar or array) is refused
        here with a TypeError naming its key, instead of writing a file that cannot be loaded.
      rng: also save torch/CUDA, Python and NumPy RNG states (default True).

    The file also holds ``format`` and ``sha256``, a digest of everything else
    (:func:`payload_digest`), which :func:`load_checkpoint` verifies.
    """
    extra = dict(extra or {})
    check_loadable(extra, "extra")
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "params": tree_to_state_dict(params),
        "opt_state": tree_to_state_dict(opt_state),
        "step": int(step),
        "extra": extra,
    }
    if rng:
        payload["rng"] = get_rng_state()
    payload["sha256"] = payload_digest(payload)
    tmp = os.fspath(path) + ".tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no half-written file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(
    path: str | os.PathLike[str],
    params_like: PyTree,
    opt_state_like: PyTree,
    *,
    restore_rng: bool = True,
    hyperparams: str = "template",
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (with ``weights_only=True``).

    Args:
      path: the file.
      params_like: a parameter pytree of the saved structure, shapes and dtypes; its values are
        not used, its leaves' devices are where the loaded leaves go.
      opt_state_like: an optimizer state of the saved structure, e.g. ``tx.init(params_like)``.
      restore_rng: restore the saved RNG states (default True; a no-op if none were saved).
      hyperparams: where the state's hyperparameter fields come from (the fields declared with
        :func:`funcopt.register_hyperparameters`: ``learning_rate`` of
        :func:`funcopt.scale_by_learning_rate` and schedule-free, the entries of
        ``inject_hyperparams``' ``hyperparams``). ``"template"`` (default): from
        ``opt_state_like``, i.e. from the transform you built, as in optax, where such
        hyperparameters are arguments of the transform and not state; the saved leaves must
        be there (same structure) but their dtype and shape are not compared, so a transform
        rebuilt with another ``hyperparam_dtype`` loads. ``"saved"``: the saved values (the
        state exactly as it was saved); a template field of another dtype or shape is then a
        ValueError naming the field.

    Every other leaf of the state (moments, step counts, ...) is the saved one. So a transform
    rebuilt with a new learning rate resumes with that rate::

        tx = fo.adam(1e-4)                  # was fo.adam(0.1) when saved
        ck = fo.load_checkpoint(path, params, tx.init(params))
        tx.update(grads, ck.opt_state, ck.params)               # steps with 1e-4

    A value written into the state during training (``state.hyperparams[...] = ...``) is
    replaced by the template's unless ``hyperparams="saved"`` is passed. A learning-rate
    schedule is evaluated at the restored step count, so it resumes where it was either way;
    a field that only records a schedule's value of the last step (``learning_rate`` of
    :func:`funcopt.scale_by_learning_rate`, schedule-free or
    :func:`funcopt.scale_by_sample_schedule`, ``inject_hyperparams``' scheduled entries and
    the wrapped transform's copies of them) keeps the saved record, when ``opt_state_like``
    is the template's ``init`` output itself, which marks those fields
    (:func:`funcopt.base.mark_schedule_value`).
    :meth:`funcopt.Optimizer.load_state_dict` follows torch.optim instead: it restores the
    saved param groups' ``lr``.

    Returns:
      ``Checkpoint(params, opt_state, step, extra)``.
    """
    if not (isinstance(hyperparams, str) and hyperparams in ("template", "saved")):
        raise ValueError(f"load_checkpoint: hyperparams={hyperparams!r}; pass 'template' (the "
                         "transform's own values, the default) or 'saved'")
    payload = _read(path)
    params = tree_from_state_dict(payload["params"], params_like, "params")
    opt_state = _from_state_dict(payload["opt_state"], opt_state_like, "optimizer state",
                                 hyperparams)
    if restore_rng and "rng" in payload:
        set_rng_state(payload["rng"])
    return Checkpoint(params, opt_state, payload["step"], payload["extra"])


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a checkpoint file: one ValueError for anything that is not an intact one."""
    name = repr(os.fspath(path))
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{name} is empty (0 bytes): not a funcopt checkpoint")
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise ValueError(f"{name} is not a whole checkpoint: it has no zip directory at its end, "
                         "so it was truncated (a save or copy cut short), garbled, or is not a "
                         "file torch.save wrote")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ValueError(
            f"{name} holds {'a ' + found.group(1) if found else 'an object'}, which a "
            "weights_only load does not read: save_checkpoint did not write this file (or it was "
            "altered), and funcopt never unpickles arbitrary objects"
        ) from None
    except Exception as e:  # a zip whose records are damaged
        raise ValueError(f"{name} is a damaged checkpoint: torch could not read it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{name} is a torch file but not a funcopt checkpoint "
                         "(it has no 'format' entry)")
    fmt = payload["format"]
    if type(fmt) is int and fmt > _FORMAT:
        raise ValueError(f"{name} has checkpoint format {fmt}, written by a newer funcopt; this "
                         f"one reads formats {_READABLE}: upgrade funcopt to load it")
    if fmt not in _READABLE:
        raise ValueError(f"{name} has an unknown checkpoint format {fmt!r}: not a funcopt checkpoint")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise ValueError(f"{name} is missing {missing}: the file is corrupted")
    if fmt >= 2:
        want = payload.pop("sha256", None)
        if want is None:
            raise ValueError(f"{name} has no 'sha256' entry: the file is corrupted")
        if want != payload_digest(payload):
            raise ValueError(f"{name} fails its SHA-256 check: its content changed "
                             "after it was written (a corrupted or edited file)")
    return payload


def check_loadable(obj: Any, where: str = "extra") -> None:
    """Raise a TypeError naming the first value in ``obj`` that a ``weights_only`` load refuses.

    ``where`` is the name printed for ``obj``; nested values are named by their key path,
    e.g. ``extra['config']['layers'][0]``.
    """
    if type(obj) in _TENSORS:
        if obj.layout != torch.strided or obj.is_quantized or obj.is_meta:
            raise TypeError(f"{where} is a {obj.layout} tensor{' (quantized)' * obj.is_quantized}"
                            f"{' on the meta device' * obj.is_meta}; store a dense tensor with "
                            "data (e.g. .to_dense())")
        return
    if type(obj) in _SCALARS:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            check_loadable(k, f"a key of {where}")
            check_loadable(v, f"{where}[{k!r}]")
        return
    if type(obj) in _CONTAINERS:
        for i, v in enumerate(obj):
            check_loadable(v, f"{where}[{i}]" if type(obj) is not set else f"an element of {where}")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot read back. Store plain data instead: "
        f"{_fix(obj)}, and rebuild the object after load_checkpoint."
    )


def _fix(obj: Any) -> str:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return "dataclasses.asdict(value) for a dataclass"
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return "value._asdict() for a NamedTuple"
    if isinstance(obj, np.ndarray):
        return "torch.from_numpy(value) for a NumPy array"
    if isinstance(obj, np.generic):
        return "value.item() for a NumPy scalar"
    return "numbers, strings, tensors, lists and dicts of these"


def payload_digest(obj: Any) -> str:
    """SHA-256 (hex) of a checkpoint payload's content: every key, number, string, and tensor
    dtype, shape and bytes, in order (a set's elements in sorted digest order). It depends on
    the values only, not on how ``torch.save`` lays out the file."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    kind = type(obj)
    if kind in _TENSORS:
        t = obj.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data)
    elif kind in (dict, collections.OrderedDict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif kind is set:
        h.update(f"S{len(obj)}:".encode())
        for d in sorted(payload_digest(v) for v in obj):
            h.update(d.encode())
    elif kind in (list, tuple, torch.Size):
        h.update(f"{kind.__name__}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif kind is float:
        h.update(f"f{obj.hex()};".encode())
    elif kind is complex:
        h.update(f"c{obj.real.hex()},{obj.imag.hex()};".encode())
    elif kind in (str, bytes):
        data = obj.encode() if kind is str else obj
        h.update(f"{kind.__name__}{len(data)}:".encode())
        h.update(data)
    else:  # None, bool, int, dtype, device: their repr is exact
        h.update(f"{kind.__name__}{obj!r};".encode())
