"""Two problems closer to practice, with no downloads: a character-level transformer language
model on text that ships with Python, and a CIFAR-sized CNN on generated images.

Each comes in a quick size (the default suite, for a CPU) and a ``-large`` size (``--suite
full``, meant for ``--device cuda``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.func import functional_call

from funcopt.bench.problems import Problem, classifier, register

__all__ = ["CharTransformer", "corpus", "hard_shapes_images", "shapes_images"]


# --------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """The help texts of Python's own documentation (``pydoc_data.topics``, about 460,000
    characters of English prose and code, part of the standard library), in a fixed order; a
    text generated from a small grammar where a Python build leaves that module out."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return _generated_text(400_000)
    return "\n".join(topics[k] for k in sorted(topics))


def _generated_text(n: int) -> str:
    g = torch.Generator().manual_seed(0)
    subjects = ["the model", "a parameter", "the optimizer", "each step", "the loss", "a gradient"]
    verbs = ["updates", "reduces", "follows", "scales", "returns", "checks"]
    objects = ["the state", "a learning rate", "the batch", "every leaf", "the curvature"]
    words: list[str] = []
    while sum(map(len, words)) < n:
        pick = lambda xs: xs[int(torch.randint(len(xs), (), generator=g))]
        words.append(f"{pick(subjects)} {pick(verbs)} {pick(objects)}. ")
    return "".join(words)[:n]


class CharTransformer(nn.Module):
    """A decoder-only transformer: token + position embeddings, ``layers`` pre-norm blocks of
    causal multi-head attention and a 4x GELU MLP, a final LayerNorm and a linear read-out."""

    def __init__(self, vocab: int, context: int, width: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width),
                           "proj": nn.Linear(width, width), "norm2": nn.LayerNorm(width),
                           "up": nn.Linear(width, 4 * width), "down": nn.Linear(4 * width, width)})
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            assert isinstance(blk, nn.ModuleDict)
            q, k, v = blk["qkv"](blk["norm1"](h)).split(h.shape[-1], dim=-1)
            q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["proj"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["down"](nn.functional.gelu(blk["up"](blk["norm2"](h))))
        return self.head(self.norm(h))


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _char_lm(seed: int, device: torch.device, *, context: int, width: int, layers: int,
             batch_size: int, steps: int, eval_windows: int, target: float,
             lr_scale: float = 1.0) -> Problem:
    chars, ids = _encoded()
    n = len(ids)
    train, val, test = ids[: int(0.9 * n)], ids[int(0.9 * n): int(0.95 * n)], ids[int(0.95 * n):]
    torch.manual_seed(seed)
    model = CharTransformer(len(chars), context, width, heads=4, layers=layers).to(device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)

    def windows(data: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(context + 1)
        w = data[idx].to(device)
        return w[:, :-1], w[:, 1:]

    def fixed(data: torch.Tensor):  # evenly spaced windows: the same for every run
        return windows(data, torch.linspace(0, len(data) - context - 2, eval_windows).long())

    val_batch, test_batch = fixed(val), fixed(test)
    train_probe = fixed(train)
    cache: dict[int, tuple] = {}

    def batches(step: int):  # random windows of the training text, drawn in step order
        while step not in cache:
            k = len(cache)
            cache[k] = windows(train, torch.randint(len(train) - context - 1, (batch_size,),
                                                    generator=g))
        return cache[step]

    def loss_fn(p, batch):
        x, y = batch
        return _token_loss(functional_call(model, p, (x,)), y)

    @torch.no_grad()
    def score(p, batch):
        return {"loss": float(loss_fn(p, batch))}

    return Problem(
        params=params, loss_fn=loss_fn, batches=batches, model=model, steps=steps,
        evaluate=lambda p: {**score(p, test_batch), "train_loss": score(p, train_probe)["loss"]},
        validate=lambda p: score(p, val_batch), kind="language-model", batch_size=batch_size,
        loss_name="cross-entropy per character (nats)", target=target,
        capture={"loss": _token_loss, "loss_average": "batch+sequence"},
        extra={"vocab": len(chars), "characters": n, "context": context}, lr_scale=lr_scale,
    )


@functools.lru_cache(maxsize=1)
def _encoded() -> tuple[list[str], torch.Tensor]:
    """The corpus's characters (sorted) and the text as their indices."""
    text = corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return chars, torch.tensor([index[c] for c in text], dtype=torch.int64)


@register("char-transformer", default=True, full=False)
def char_transformer(seed: int, device: torch.device) -> Problem:
    """A 2-layer, 32-wide character transformer (context 32, about 30k parameters) on Python's
    documentation text; cross-entropy per character on held-out text."""
    return _char_lm(seed, device, context=32, width=32, layers=1, batch_size=16, steps=60,
                    eval_windows=64, target=2.7, lr_scale=10 ** 0.5)  # short run: larger rates


@register("char-transformer-large", full=True)
def char_transformer_large(seed: int, device: torch.device) -> Problem:
    """A 4-layer, 256-wide character transformer (context 128, about 3.2M parameters) on
    Python's documentation text (``--suite full``; for a GPU)."""
    return _char_lm(seed, device, context=128, width=256, layers=4, batch_size=64, steps=1000,
                    eval_windows=256, target=1.6)


# --------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=2)
def shapes_images(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated 3 x ``size`` x ``size`` images in 10 classes, and their labels.

    Class ``c`` is a grating at angle ``18 c`` degrees and ``2 + c % 4`` cycles per image, in
    colour ``c``, under a soft disc at a random place; each image draws its own phase, an angle
    jitter of +-8 degrees, a random mix with a second colour, and pixel noise (sd 0.3).
    The same arguments give the same tensors (cached: do not modify them).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g)
    palette = torch.rand(10, 3, generator=g)
    u = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    angle = math.pi * (labels.float() / 10 + (torch.rand(n, generator=g) - 0.5) * 0.09)
    freq = math.pi * (2 + labels % 4).float()
    phase = 2 * math.pi * torch.rand(n, generator=g)
    along = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    grating = torch.sin(freq[:, None, None] * along + phase[:, None, None])
    centre = torch.rand(n, 2, generator=g) * 1.2 - 0.6
    r2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
    disc = torch.sigmoid((0.35 - r2) * 20)
    mix = torch.rand(n, 1, generator=g)
    colour = (1 - mix) * palette[labels] + mix * torch.rand(n, 3, generator=g)
    img = colour[:, :, None, None] * (grating * (0.3 + 0.7 * disc))[:, None] + 0.2 * disc[:, None]
    img = img + 0.3 * torch.randn(img.shape, generator=g)
    return (img - img.mean()) / img.std(), labels


@functools.lru_cache(maxsize=2)
def hard_shapes_images(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A harder version of :func:`shapes_images`: ``n`` images (3 x ``size`` x ``size``) in the
    same 10 classes, whose classes overlap, so that no classifier reaches perfect accuracy.

    Class ``c`` is again a grating at ``18 c`` degrees and ``2 + c % 4`` cycles per image under
    a soft disc at a random place, but each image draws

    - an angle jitter of +-15 degrees (neighbouring classes are 18 degrees apart, so their
      angles overlap) and a frequency jitter of +-0.6 cycles;
    - a contrast in [0.25, 1] (some gratings are faint);
    - a random mix of the class colour with a random one, as in :func:`shapes_images`;
    - a label-free distractor: a second grating of random angle (any), frequency (2 to 5
      cycles), phase and colour, with contrast in [0, 0.8], under a second disc;
    - pixel noise of sd 0.6 (twice :func:`shapes_images`'s).

    The images are standardised over the whole set. The same arguments give the same tensors
    (cached: do not modify them); 14,000 images take 2 to 3 s on a 2-core CPU.
    """
    g = torch.Generator().manual_seed(seed)
    rand = functools.partial(torch.rand, generator=g)
    labels = torch.randint(10, (n,), generator=g)
    palette = rand(10, 3)
    u = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(u, u, indexing="ij")

    def grating(angle: torch.Tensor, cycles: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        along = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
        return torch.sin(math.pi * cycles[:, None, None] * along + phase[:, None, None])

    def disc() -> torch.Tensor:  # a soft disc of radius 0.6 at a random centre
        centre = rand(n, 2) * 1.2 - 0.6
        r2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
        return torch.sigmoid((0.35 - r2) * 20)

    angle = math.pi * (labels.float() / 10 + (rand(n) - 0.5) * (30 / 180))
    cycles = (2 + labels % 4).float() + (rand(n) - 0.5) * 1.2
    main = grating(angle, cycles, 2 * math.pi * rand(n))
    spot = disc()
    mix = rand(n, 1)
    colour = (1 - mix) * palette[labels] + mix * rand(n, 3)
    contrast = 0.25 + 0.75 * rand(n)
    img = (colour[:, :, None, None] * (contrast[:, None, None] * main * (0.3 + 0.7 * spot))[:, None]
           + 0.2 * spot[:, None])
    other = grating(math.pi * rand(n), 2 + 3 * rand(n), 2 * math.pi * rand(n))
    spot2 = disc()
    strength = 0.8 * rand(n)
    img = img + rand(n, 3)[:, :, None, None] * (strength[:, None, None] * other * spot2)[:, None]
    img = img + 0.6 * torch.randn(img.shape, generator=g)
    return (img - img.mean()) / img.std(), labels


def _cnn(width: int) -> nn.Module:
    """conv 3x3 stride 2 (to 16x16), conv 3x3 stride 2 (to 8x8), conv 3x3, global average
    pool, linear; ReLU between; ``width``, ``2 width``, ``4 width`` channels."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4 * w, 10))


def _shapes(seed: int, device: torch.device, *, n_train: int, n_val: int, n_test: int,
            width: int, batch_size: int, steps: int, target: float,
            lr_scale: float = 1.0, images=shapes_images) -> Problem:
    x, y = images(n_train + n_val + n_test)  # fixed data; ``seed`` picks the split
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = [n_train, n_train + n_val]
    data = (x[: cut[0]], y[: cut[0]], x[cut[0]: cut[1]], y[cut[0]: cut[1]], x[cut[1]:], y[cut[1]:])
    torch.manual_seed(seed)
    model = _cnn(width).to(device)
    return classifier(model, tuple(t.to(device) for t in data), seed, batch_size=batch_size,
                      steps=steps, target=target, lr_scale=lr_scale)


@register("cifar-cnn", default=True, full=False)
def cifar_cnn(seed: int, device: torch.device) -> Problem:
    """A 3-conv CNN (8-16-32 channels, about 6k parameters) on 512 generated CIFAR-sized
    (3x32x32) images in 10 classes (:func:`shapes_images`); 256 validation, 512 test."""
    return _shapes(seed, device, n_train=512, n_val=256, n_test=512, width=8, batch_size=32,
                   steps=60, target=0.5, lr_scale=10 ** 0.5)  # short run: larger rates


@register("cifar-cnn-large", full=True)
def cifar_cnn_large(seed: int, device: torch.device) -> Problem:
    """The same CNN 64-128-256 channels wide (about 370k parameters) on the harder images of
    :func:`hard_shapes_images` (overlapping classes, faint gratings, a distractor, more
    noise): 8,000 training images (1,000 steps of 128 are 16 passes, so generalisation
    matters), 2,000 validation, 4,000 test (``--suite full``; for a GPU).

    Calibrated on an H100 with torch.optim's AdamW (weight decay 1e-4) and SGD (momentum 0.9),
    1,000 steps of 128 (test accuracy, test loss; the step where the loss passed 0.6):
    AdamW lr 1e-3: 0.84, 0.49, 500 (seeds 1 and 2: 0.85, 0.47, 500; 0.83, 0.50, 600);
    3e-4: 0.82, 0.56, 800; 2e-3: at chance for 300 steps, then 0.67, 0.99, never; 3e-3: every
    ReLU dead, chance (2.303) throughout. SGD lr 0.1: 0.85, 0.48, 300; 0.03: 0.83, 0.53, 700;
    0.3: chance throughout. The target, 0.6, is thus reached around the middle of the run by a
    well-tuned method and not at all by weaker settings."""
    return _shapes(seed, device, n_train=8_000, n_val=2_000, n_test=4_000, width=64,
                   batch_size=128, steps=1000, target=0.6, images=hard_shapes_images)
