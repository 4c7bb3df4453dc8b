"""flatq-train's config validation (app/config.py): bad values fail before the fit, naming the key."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "override,msg",
    [("trainer.max_epochs=abc", "trainer.max_epochs must be an integer (or null), got 'abc'"),
     ("+trainer.max_steps=1.5", "trainer.max_steps must be an integer (or null), got 1.5"),
     ("+trainer.limit_train_batches=lots", "trainer.limit_train_batches must be a number (or null), got 'lots'")],
)
def test_flatq_train_trainer_numbers_fail_before_fit(override, msg):
    from flatq_lightning.app.train import ConfigError, validate_config
    from tests.app.test_train import _compose

    with pytest.raises(ConfigError) as ei:
        validate_config(_compose([override]))
    assert str(ei.value) == msg


def test_flatq_train_seed_must_be_an_integer():
    from flatq_lightning.app.train import ConfigError, validate_config
    from tests.app.test_train import _compose

    with pytest.raises(ConfigError, match=r"^seed must be an integer, got 'abc'$"):
        validate_config(_compose(["seed=abc"]))
