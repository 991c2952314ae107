"""Reproducible noise for batched sampling.

Hypothesis ``k`` of image ``i`` must not depend on how many images share a batch. The
samplers therefore accept one ``torch.Generator`` *per row*: row ``r`` draws its initial
``x_T`` and all later noise from its own generator, so the rows of one batched loop are
independent streams. :func:`row_generators` seeds row ``(i, k)`` from
``derive_seed(seed, i, k)`` (a numpy ``SeedSequence`` hash), so the same
``(seed, image index, candidate index)`` always gives the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["derive_seed", "row_generators", "RowNoise", "GeneratorLike"]

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None

#: Per-row noise is drawn this many steps at a time (a fixed constant, so the values a
#: row sees do not depend on the batch it is in).
NOISE_CHUNK = 64


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. ``derive_seed(seed, image, k)``."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(
        2, np.uint32
    )
    return int((int(words[0]) << 32 | int(words[1])) & 0x7FFFFFFFFFFFFFFF)


def row_generators(
    seed: int,
    n: int,
    image_indices: Sequence[int] | Tensor,
    device: str | torch.device = "cpu",
) -> list[torch.Generator]:
    """Generators for ``len(image_indices) * n`` rows.

    Row ``i * n + k`` is seeded from ``(seed, image_indices[i], k)``.

    Args:
        seed: base seed.
        n: hypotheses per image.
        image_indices: one global index per image of the batch (use the image's position
            in the whole dataset, not in the batch, for batch-size independence).
        device: device of the generators (``"cpu"`` gives the same numbers everywhere).
    """
    gens = []
    for i in [int(v) for v in image_indices]:
        for k in range(n):
            g = torch.Generator(device=device)
            g.manual_seed(derive_seed(seed, i, k))
            gens.append(g)
    return gens


def fresh_generator() -> torch.Generator:
    """A CPU generator with a non-deterministic seed (never touches the global RNG)."""
    g = torch.Generator()
    g.seed()
    return g


class RowNoise:
    """Standard-normal draws for ``rows`` x ``dim``, from one generator or one per row.

    * one ``torch.Generator``: each draw is ``randn(rows, dim)`` from it (values depend on
      ``rows``);
    * a sequence of ``rows`` generators: row ``r`` uses only generator ``r``; its first
      draw (``x_T``) is ``randn(dim)``, later draws come in chunks of ``NOISE_CHUNK``
      steps, so the values are independent of the other rows and of ``rows``;
    * ``None``: a fresh non-deterministically seeded generator.

    Draws are made on the generators' device in float32 and returned on ``device``.
    """

    def __init__(
        self, rows: int, dim: int, generator: GeneratorLike, device: torch.device | str
    ) -> None:
        self.rows, self.dim, self.device = rows, dim, torch.device(device)
        if generator is None:
            generator = fresh_generator()
        if isinstance(generator, torch.Generator):
            self.single: torch.Generator | None = generator
            self.per_row: list[torch.Generator] = []
        else:
            self.single = None
            self.per_row = list(generator)
            if len(self.per_row) != rows:
                raise ValueError(
                    f"got {len(self.per_row)} generators for {rows} rows; pass one per row"
                )
        self._chunk: Tensor | None = None
        self._pos = NOISE_CHUNK

    def initial(self) -> Tensor:
        """x_T: (rows, dim) float32."""
        if self.single is not None:
            g = self.single
            return torch.randn(self.rows, self.dim, generator=g, device=g.device).to(self.device)
        draws = [torch.randn(self.dim, generator=g, device=g.device) for g in self.per_row]
        return torch.stack(draws).to(self.device)

    def next(self) -> Tensor:
        """The next step's noise: (rows, dim) float32."""
        if self.single is not None:
            g = self.single
            return torch.randn(self.rows, self.dim, generator=g, device=g.device).to(self.device)
        if self._pos >= NOISE_CHUNK:
            draws = [
                torch.randn(NOISE_CHUNK, self.dim, generator=g, device=g.device)
                for g in self.per_row
            ]
            self._chunk = torch.stack(draws, dim=1).to(self.device)  # (chunk, rows, dim)
            self._pos = 0
        out = self._chunk[self._pos]
        self._pos += 1
        return out


class GivenNoise:
    """Per-step noise supplied by the caller: a ``(K, rows, dim)`` tensor (step ``k`` takes
    ``noise[k]``) or a callable ``k -> (rows, dim)``; ``k`` counts the sampler's stochastic
    steps from 0 (DDPM: one per step but the last; DDIM with ``eta > 0``: one per step).

    It stands in for :class:`RowNoise` so that a reference run's draws can be replayed.
    """

    def __init__(self, noise: Tensor | Callable[[int], Tensor], rows: int, dim: int,
                 device: torch.device | str) -> None:
        self.noise, self.shape, self.device, self.k = noise, (rows, dim), torch.device(device), 0

    def next(self) -> Tensor:
        k, self.k = self.k, self.k + 1
        if callable(self.noise):
            z = self.noise(k)
        else:
            if k >= len(self.noise):
                raise ValueError(f"the given noise has {len(self.noise)} steps; the sampler needs more")
            z = self.noise[k]
        z = torch.as_tensor(z)
        if tuple(z.shape) != self.shape:
            raise ValueError(f"noise for step {k} must have shape {self.shape}, got {tuple(z.shape)}")
        return z.to(self.device, torch.float32)
