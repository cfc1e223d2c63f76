"""Hypothesis without its timing checks: speed is for the benchmark, never for a test (a slow first
draw on a busy CI machine once failed a property test with HealthCheck.too_slow)."""

from hypothesis import HealthCheck, settings

settings.register_profile("bridge", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bridge")

# A real PostgreSQL server for the records tests (tests/pg.py): fixtures postgres_server, pg_url.
from tests.pg import pg_url, postgres_server  # noqa: E402, F401
