"""Dataset-aware defaults live in the config tree (``configs/dataset_model``): 8x8 digits get a
two-block ConvNet in ``central`` (``simulate`` not yet: see the YAML), other datasets the
literature's three blocks, and the command line still wins."""

from __future__ import annotations

import pytest

from fedistill.config import compose_config


@pytest.mark.parametrize("command", ["central"])
def test_digits_convnet_has_two_blocks(command):
    assert compose_config(command, [])["model"]["depth"] == 2
    assert compose_config(command, ["method=dc"])["model"]["depth"] == 2
    assert compose_config(command, ["dataset=fashion_mnist"])["model"]["depth"] == 3
    assert compose_config(command, ["model.depth=3"])["model"]["depth"] == 3


def test_presets_keep_the_dataset_default_and_other_models_are_untouched():
    paper = compose_config("central", ["preset=paper"])["model"]
    assert paper["depth"] == 2 and paper["width"] == 128
    assert "depth" not in compose_config("central", ["model=mlp"])["model"]
