"""cpt_studio.resources."""
