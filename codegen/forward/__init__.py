"""The forward kernel family: source generator (``generate``), launcher (``launch``) and the dense
fp32 oracle beside it (``reference``)."""
