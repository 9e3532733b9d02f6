"""TinyFusion learnable depth pruning for diffusion transformers, as Lightning callbacks."""
