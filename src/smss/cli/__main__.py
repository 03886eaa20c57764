"""``python -m smss.cli`` runs the ``smss`` command."""

from smss.cli.main import main

main()
