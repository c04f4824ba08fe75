"""Shared test fixtures.

Real data lives in ``../shared`` (next to the checkout) on developer machines and in CI; a user's fresh
clone does not have it, so tests that need it skip with a clear reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_configs import tiny_dinov2_config, tiny_resnet_config, tiny_vit_config
from transformers import Dinov2Config, ResNetConfig, ViTConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("HF_USEG_SHARED", REPO_ROOT.parent / "shared"))
SHARED_DATA = SHARED_DIR / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data``; skips the test when the folder is absent (a fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only developer machines and CI have ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def camvid_root(shared_data: Path) -> Path:
    root = shared_data / "camvid11"
    if not root.is_dir():
        pytest.skip(f"CamVid not found at {root}")
    return root


# ----------------------------------------------------------------------------------------------------------------
# tiny random backbones (tests/tiny_configs.py; import the functions there for module-level use)


@pytest.fixture
def tiny_vit() -> ViTConfig:
    """A fresh 1-layer, 32-channel ViT config with 8x8 patches (see `tiny_configs.tiny_vit_config`)."""
    return tiny_vit_config()


@pytest.fixture
def tiny_dinov2() -> Dinov2Config:
    return tiny_dinov2_config()


@pytest.fixture
def tiny_resnet() -> ResNetConfig:
    """A fresh ResNet-18-shaped config with one basic block per stage (see `tiny_configs.tiny_resnet_config`)."""
    return tiny_resnet_config()


# ----------------------------------------------------------------------------------------------------------------
# hypothesis (tests/test_properties.py): the same examples on every run and machine, no example database in the
# checkout, no per-example deadline (the first call of a transform pays for imports and warm-up)

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the dev extra is not installed; test_properties.py skips itself
    pass
else:
    _hypothesis_settings.register_profile("hf_useg", derandomize=True, database=None, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hf_useg"))
