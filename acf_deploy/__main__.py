"""``python -m acf_deploy`` runs the CLI."""

from .cli import app

app()
