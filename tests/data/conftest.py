"""Fixtures of the data tests (helpers live in data_testutil.py, a name unique in the suite)."""

from data_testutil import *  # noqa: F401,F403 - re-export the fixtures to pytest
