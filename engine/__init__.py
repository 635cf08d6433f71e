"""cpt_studio.engine."""
