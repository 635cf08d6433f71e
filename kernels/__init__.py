"""cpt_studio.kernels."""
