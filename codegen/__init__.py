"""Code generation: plans -> Triton kernels, block tables, executors and the kernel dump."""

from attncc.codegen.generate import kernel_name

__all__ = ["kernel_name"]
