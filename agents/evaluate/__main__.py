"""``python -m agents.evaluate``: see :mod:`agents.evaluate.core`."""

from agents.evaluate.core import cli

if __name__ == "__main__":
    cli()
