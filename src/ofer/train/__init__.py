"""Training: the shared loop in named stages (``loop``), EMA (``ema``), the IdGen/ExpGen/IdRank
tasks (``tasks``), datasets, FLAME and the dry run (``build``) and the three trainers
(``entry``; ``python -m ofer.train KIND``). Devices and ``torchrun`` are :mod:`ofer.device`,
checkpoints :mod:`ofer.models.checkpoint`."""
