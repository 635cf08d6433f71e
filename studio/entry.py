"""The `cpt-studio` command: no arguments opens the desktop app; a subcommand runs headless."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):   # a subcommand; options alone belong to the app
        from cpt_studio.engine.cli import main as cli_main
        return cli_main(argv)
    from cpt_studio.studio.app import main as app_main
    return app_main(argv)
