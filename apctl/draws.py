"""Random draws of a training batch that depend on each sample's global index, not on how the batch is split.

A step's global batch of B samples is split over ranks and, within a rank, into micro-batches
(`training.batch_per_device`). Sample g (0 ≤ g < B) of step k receives the same data, indices and
noise whatever the split, so 1 process × 4 micro-batches, 2 processes × 2 and 1 × 1 compute the
same gradient up to float rounding. `RowDraws` hands out the values of the rows [a, b) of the
global batch, each draw a tensor of shape (b − a, *row_shape):

    small draws (≤ SMALL_ROW values per row: indices, σ, flips, 2-D points):
        one generator per (seed, step, draw number) draws all B rows; rows [a, b) are kept
    large draws (images):
        one generator per (seed, step, row g), consumed in draw order; rows a … b − 1 stacked

Both are functions of (seed, step, draw number, g) alone. Drawing all B rows of a small draw in every
micro-batch costs B·SMALL_ROW values at most, while a per-row generator costs a few µs per row and
draw, which would dominate a 2-D step; an image row is thousands of values, so per-row generators
cost nothing extra there. The callers make the same draws in the same order in every micro-batch
(no draw depends on the batch size), which is what keeps the draw numbers aligned.

`GeneratorDraws` is the same interface on one plain torch.Generator for a whole batch (statistics,
samples, tests): each method is the single torch call the code made before, so those streams are
unchanged. Objectives and data sources take either; `as_draws(gen, n)` wraps a plain generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SMALL_ROW = 256   # values per row up to which a draw is made for the whole global batch


def derive_seed(*words: int) -> int:
    """A 64-bit seed from a word sequence, independent across different sequences (NumPy's SeedSequence)."""
    entropy = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return int(entropy[0]) << 32 | int(entropy[1])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), a bijection of uint64 with full avalanche: distinct
    rows of one step get unrelated generator seeds for the cost of a few vector operations."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class GeneratorDraws:
    """Draws for a batch of `n` rows from one torch.Generator, one torch call per draw. Like every draw of
    a step they are made on the CPU, where the generators live (the same numbers on any device); the
    step moves each batch to the run's device once."""

    def __init__(self, generator: torch.Generator, n: int):
        self.generator, self.n = generator, int(n)
        self.total = self.n          # the whole batch: rows() are 0 … n − 1

    def __len__(self) -> int:
        return self.n

    def rows(self) -> torch.Tensor:
        """The rows' indices in the batch (CPU long)."""
        return torch.arange(self.n)

    def randn(self, row_shape=(), dtype=torch.float32) -> torch.Tensor:
        return torch.randn((self.n, *row_shape), generator=self.generator, dtype=dtype)

    def rand(self, row_shape=(), dtype=torch.float32) -> torch.Tensor:
        return torch.rand((self.n, *row_shape), generator=self.generator, dtype=dtype)

    def randint(self, high: int) -> torch.Tensor:
        """One integer per row, uniform on 0 … high − 1."""
        return torch.randint(0, high, (self.n,), generator=self.generator)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row with probabilities `probs` (K,) for every row, or (n, K) row by row."""
        if probs.dim() == 1:
            return torch.multinomial(probs, self.n, replacement=True, generator=self.generator)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


class RowDraws:
    """Draws for the rows `rows` (a range) of a global batch of `total` rows at the step keyed by `key`
    (e.g. (seed, step)); see the module docstring for the two kinds of draw."""

    def __init__(self, key: tuple[int, ...], rows: range, total: int):
        if not (0 <= rows.start <= rows.stop <= total and rows.step == 1):
            raise ValueError(f"rows {rows} are not a slice of a batch of {total}")
        self.key, self.row_range, self.total = tuple(key), rows, int(total)
        self.calls = 0
        self._row_generators: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.row_range)

    def rows(self) -> torch.Tensor:
        """The rows' global indices (CPU long)."""
        return torch.arange(self.row_range.start, self.row_range.stop)

    def _draw(self, fn, row_shape, **kw) -> torch.Tensor:
        self.calls += 1
        row_shape = tuple(row_shape)
        if math.prod(row_shape) <= SMALL_ROW:
            gen = torch.Generator().manual_seed(derive_seed(*self.key, 0, self.calls))
            return fn((self.total, *row_shape), generator=gen, **kw)[self.row_range.start:self.row_range.stop]
        return torch.stack([fn(row_shape, generator=g, **kw) for g in self._generators()])

    def _generators(self) -> list[torch.Generator]:
        if self._row_generators is None:
            base = np.uint64(derive_seed(*self.key, 1))
            with np.errstate(over="ignore"):
                seeds = _mix64(base + np.arange(self.row_range.start, self.row_range.stop, dtype=np.uint64))
            self._row_generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return self._row_generators

    def randn(self, row_shape=(), dtype=torch.float32) -> torch.Tensor:
        return self._draw(torch.randn, row_shape, dtype=dtype)

    def rand(self, row_shape=(), dtype=torch.float32) -> torch.Tensor:
        return self._draw(torch.rand, row_shape, dtype=dtype)

    def randint(self, high: int) -> torch.Tensor:
        """One integer per row, uniform on 0 … high − 1."""
        return self._draw(lambda size, **kw: torch.randint(0, high, size, **kw), ())

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row with probabilities `probs` (K,) for every row, or (n, K) row by row: the
        inverse CDF at a per-row uniform, so a row's index depends on its own probabilities only."""
        u = self.rand((), dtype=torch.float64)
        cdf = probs.to(torch.float64).cumsum(-1)
        cdf = cdf.expand(len(self), -1).contiguous() if cdf.dim() == 1 else cdf
        index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return index.clamp(max=cdf.shape[1] - 1)


def as_draws(gen, n: int):
    """`gen` itself when it is a RowDraws or GeneratorDraws of `n` rows; a plain torch.Generator (or None)
    wrapped in a GeneratorDraws."""
    if gen is None or isinstance(gen, torch.Generator):      # None: torch's global generator
        return GeneratorDraws(gen, n)
    if len(gen) != n:
        raise ValueError(f"draws for {len(gen)} rows used for a batch of {n}")
    return gen
