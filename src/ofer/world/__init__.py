"""The synthetic world: procedural FLAME-format heads rendered on the CPU, for tests and the demo.

Modules (import them directly; nothing heavy is imported here):

* :mod:`ofer.world.head` — a procedural head written in the FLAME file formats (model pickle,
  landmark embedding, masks), without chumpy;
* :mod:`ofer.world.build` — the world in the training layout (``python -m ofer.world``);
* :mod:`ofer.world.report` — learning evidence of sampled reconstructions on the world's
  held-out renders (``python -m ofer.world.report``);
* :mod:`ofer.world.now_scans` — synthetic heads, landmarks and scans in the NoW layout, for the
  evaluator's tests and benchmarks.
"""
