"""The released test script's random numbers, image after image (``noise: released``).

The released ``test.py`` seeds everything with 1 (Python, NumPy, torch), builds its models,
then, before its image loop, draws ``r = np.random.randint(1000)`` and reseeds everything with
``r``. For each image of its list, in order:

1. IdGen samples its N rows: ``x_T = torch.randn(N, D)`` then one ``torch.normal(0, 1, (N, D))``
   per step with ``t > 0`` (the legacy DDIM visits 999, 995, ..., 3, -1: 250 draws, unused at
   ``eta = 0``; the DDPM 999, ..., 0: 999 draws), plus one ``np.random.randint(0, N)``;
2. the ranker draws nothing;
3. ``r = np.random.randint(1000)``, everything reseeded with ``r``;
4. ExpGen samples its M rows the same way (with its own sampler).

IdGen of the next image continues the torch stream where ExpGen left it. All torch draws are
float32 on the CPU generator (moved to the model's device afterwards), so the stream is the
same on every machine; what a GPU changes is the arithmetic of the networks. Images the script
skipped consumed nothing, as do images that fail here before sampling.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ReleasedNoise", "STOCHASTIC_DRAWS", "RELEASED_SEED"]

#: The seed of the released script's ``seed_everything``.
RELEASED_SEED = 1

#: Per-step draws of each sampler the released script ran (those with ``t > 0``).
STOCHASTIC_DRAWS = {"legacy_ddim": 250, "ddpm": 999}


class ReleasedNoise:
    """The sampling noise of the released run, per image in the order of its image list.

    Args:
        n_identities, id_dim: IdGen's rows per image and sample width (100 and 300 released).
        n_expressions, exp_dim: ExpGen's (100 and 53 released).
        idgen_method, expgen_method: ``"legacy_ddim"`` or ``"ddpm"`` (the draws each consumes).
        seed: the script's first seed.

    :meth:`next_image` gives one image's ``noise`` argument of
    :meth:`ofer.sample.Reconstructor.reconstruct`; :meth:`for_images` a batch's.
    """

    def __init__(self, n_identities: int, id_dim: int, n_expressions: int, exp_dim: int,
                 idgen_method: str = "legacy_ddim", expgen_method: str = "ddpm", seed: int = RELEASED_SEED) -> None:
        for which, m in (("idgen", idgen_method), ("expgen", expgen_method)):
            if m not in STOCHASTIC_DRAWS:
                raise ValueError(f"released noise follows the released samplers ({', '.join(STOCHASTIC_DRAWS)}); "
                                 f"{which} uses {m!r}")
        self.shapes = {"idgen": (int(n_identities), int(id_dim)), "expgen": (int(n_expressions), int(exp_dim))}
        self.methods = {"idgen": idgen_method, "expgen": expgen_method}
        self.torch = torch.Generator(device="cpu")
        #: seeds set so far: the script's first, the loop's, then one per image before ExpGen
        self.seeds: list[int] = []
        self._reseed(seed)
        self._reseed(int(self.numpy.randint(1000)))
        self._last: dict[str, dict] = {}

    def _reseed(self, r: int) -> None:
        self.numpy = np.random.RandomState(r)
        self.torch.manual_seed(r)
        self.seeds.append(int(r))

    def _stage(self, which: str) -> dict:
        rows, dim = self.shapes[which]
        x_T = torch.randn(rows, dim, generator=self.torch)
        self.numpy.randint(0, rows)  # the sampler's row pick, unused
        k = STOCHASTIC_DRAWS[self.methods[which]]
        if self.methods[which] == "legacy_ddim":
            for _ in range(k):  # drawn, multiplied by sigma = 0
                torch.randn(rows, dim, generator=self.torch)
            return {"x_T": x_T}
        steps = torch.stack([torch.randn(rows, dim, generator=self.torch) for _ in range(k)])
        return {"x_T": x_T, "noise": steps}

    def next_image(self) -> dict:
        """The next image's ``{"idgen": {...}, "expgen": {...}}`` (``x_T`` (n, D), ``noise`` (K, n, D))."""
        idgen = self._stage("idgen")
        self._reseed(int(self.numpy.randint(1000)))
        return {"idgen": idgen, "expgen": self._stage("expgen")}

    def for_images(self, names: list[str]) -> dict:
        """The noise of a batch of images, drawn in the order given; names of the previous call
        get their noise again (a batch retried image by image)."""
        if all(n in self._last for n in names):
            per = {n: self._last[n] for n in names}
        else:
            per = {n: self._last[n] if n in self._last else self.next_image() for n in names}
            self._last = per
        out = {}
        for which in ("idgen", "expgen"):
            parts = [per[n][which] for n in names]
            out[which] = {"x_T": torch.cat([p["x_T"] for p in parts])}
            if "noise" in parts[0]:
                out[which]["noise"] = torch.cat([p["noise"] for p in parts], dim=1)
        return out
