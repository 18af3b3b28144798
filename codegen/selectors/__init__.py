"""Data-dependent block selection: per-plan layouts (``layout``), the pure-torch reference of every
step (``reference``), the Triton kernels (``kernels``) and their launchers (``launch``), and
attention under a selection (``run``)."""
