"""The test suite. Helpers live in tests.helpers; fixtures in tests/conftest.py."""
