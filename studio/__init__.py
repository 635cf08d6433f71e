"""cpt_studio.studio."""
