"""``python -m qpasses`` runs the command line (see :mod:`qpasses.cli`)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="qpasses")
