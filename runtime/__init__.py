"""Loading converted checkpoints and running their MoE (installed as mxconvert.runtime)."""
