"""Evaluation: exact point-to-mesh geometry, the NoW benchmark and CO-545-style metrics.

Modules (import them directly; nothing heavy is imported here):

* :mod:`ofer.eval.geometry` — mesh I/O, exact point-to-triangle distances (libigl AABB tree),
  NoW's landmark Procrustes and the scan-to-mesh dogleg refinement;
* :mod:`ofer.eval.now` — the NoW evaluator (``python -m ofer.eval.now``);
* :mod:`ofer.eval.now_submission` — NoW submission writer / checker;
* :mod:`ofer.eval.co545` — CO-545-style accuracy and diversity (``python -m ofer.eval.co545``).
"""
