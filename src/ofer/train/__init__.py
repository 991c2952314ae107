"""Training: the shared loop (``loop``), EMA (``ema``), DDP helpers (``dist``), checkpoint I/O
(``checkpoint``), the IdGen/ExpGen/IdRank tasks (``tasks``) and builders (``build``)."""
