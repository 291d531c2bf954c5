"""Helpers of the study tests: writing study files."""

import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def write_study(tmp_path):
    def write(text: str, name: str = "study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write
