"""Code generation: plans -> Triton kernels, block tables, executors and the kernel dump."""
