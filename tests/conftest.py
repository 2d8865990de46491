"""Shared pytest setup: report the backend, seed every test."""

import keras
import pytest


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1337)
    yield
    keras.config.set_dtype_policy("float32")
