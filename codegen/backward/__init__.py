"""The backward kernel family: dQ and dK/dV source generator (``generate``), launcher (``launch``)
and the exact dense gradients beside it (``reference``)."""
