"""The method tests' shared training features and queries (`fixtures.method_refs.make_data`), built once per module."""
from __future__ import annotations

import pytest

from fixtures.method_refs import make_data


@pytest.fixture(scope="module")
def data():
    return make_data()
