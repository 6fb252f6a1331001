"""Logging set-up: Hub HTTP requests only under DEBUG, and no warning about the tied LM head at each checkpoint."""
from __future__ import annotations

import logging

import pytest
import torch

from codeparrot.logs import HTTP_LOGGERS, quiet_tied_head_warning, setup_logging


@pytest.fixture
def restored_logging():
    """setup_logging replaces the root handlers and sets levels: put them back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in HTTP_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def test_hub_http_requests_are_logged_only_under_debug(restored_logging):
    setup_logging("INFO", rank=0)
    # huggingface_hub's client logs each request at INFO ("HTTP Request: GET ... 200 OK")
    assert not any(logging.getLogger(f"{name}.client").isEnabledFor(logging.INFO) for name in HTTP_LOGGERS)
    assert logging.getLogger("codeparrot.train").isEnabledFor(logging.INFO)
    assert logging.getLogger("httpx2").isEnabledFor(logging.WARNING)
    setup_logging("DEBUG", rank=0)
    assert all(logging.getLogger(name).isEnabledFor(logging.DEBUG) for name in HTTP_LOGGERS)


def test_the_tied_head_warning_of_accelerate_is_quiet_where_checkpoints_save(caplog):
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    PartialState(cpu=True)  # accelerate's loggers need its state
    shared = torch.zeros(4)
    caplog.set_level(logging.WARNING)
    with quiet_tied_head_warning():
        clean_state_dict_for_safetensors({"wte.weight": shared, "lm_head.weight": shared})  # GPT-2's tied head
    assert "Removed shared tensor" not in caplog.text
    with quiet_tied_head_warning():  # any other shared tensor is news: still warned about
        clean_state_dict_for_safetensors({"h.0.a.weight": shared, "h.0.b.weight": shared})
    assert "Removed shared tensor {'h.0.b.weight'}" in caplog.text
    caplog.clear()
    clean_state_dict_for_safetensors({"wte.weight": shared, "lm_head.weight": shared})  # outside: as accelerate has it
    assert "Removed shared tensor {'lm_head.weight'}" in caplog.text
