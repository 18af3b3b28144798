"""The run-time layer between the passes and codegen: the custom ops rewritten graphs call
(``attncc::attention`` and the selection variants), the registry their plan keys resolve in,
and the selection cache that call reuse keeps outside the graph."""
