"""Shared fixtures: paths to the shared data and to real registry models (pulled on first use)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EDGELM_DATA", ROOT.parent / "shared" / "data"))
WIKI_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = DATA_DIR / "wikitext-2" / "valid.txt"


def real_model(name: str) -> Path:
    """Path of a registry model's file, pulled into the cache if needed (slow tests only)."""
    from edgelm.registry import resolve

    return resolve(name)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return real_model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return real_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    if not WIKI_TEST.exists():
        pytest.fail(f"{WIKI_TEST} is missing: set EDGELM_DATA to the folder holding wikitext-2-raw/")
    return WIKI_TEST


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test sees the same random numbers, so a tolerance that holds once holds in CI too."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)
