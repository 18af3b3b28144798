"""Graph passes of the attncc pipeline, one per file, in the order they run (see ``pipeline.py``):
normalize, detect, bind, rewrite, thread-selections. Above the runtime and
codegen; below the backend."""
