"""The torch.func examples run and reach what they claim (small settings)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_meta_learning_lowers_the_outer_loss():
    # main returns 0 only when the validation loss after the unrolled steps fell
    assert _load("meta_learning").main(["--outer", "4"]) == 0


def test_ensemble_vmap_matches_the_loop():
    pytest.importorskip("sklearn")
    # main returns 0 only when every model's final loss agrees between vmap and the loop
    assert _load("ensemble").main(["--models", "3", "--steps", "3"]) == 0
