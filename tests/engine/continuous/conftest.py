"""The tiny demo model's engines, shared with tests/engine/test_continuous_engine.py: `engine` (the
generate() engine over a freshly made demo checkpoint), over whose loaded model tests build continuous
engines with the options they need."""

from tests.engine.test_continuous_engine import engine  # noqa: F401 - the fixture, for this package's tests
