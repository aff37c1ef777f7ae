"""Run the command-line interface with ``python -m bgapi``."""

from bgapi.cli import main

main()
