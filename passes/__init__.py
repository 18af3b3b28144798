"""Graph passes of the attncc pipeline (normalize, detect, bind, rewrite), in the order they run."""
