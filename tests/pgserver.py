"""Tests use the product's throw-away PostgreSQL helper."""
from tools.pgserver import PgServer, find_bindir, free_port  # noqa: F401
