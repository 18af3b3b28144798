"""Code generation and execution: plans -> Triton kernels (forward, backward and selector
families, each with its reference beside it), the block-sparse CPU path, the executor table,
the kernel cache, ahead-of-time compiles and the dump. Never imports the passes or the runtime."""
