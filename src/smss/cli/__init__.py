"""The ``smss`` command: subcommands (``main``) and how results are rendered for a person."""
