"""The bottom layer: helpers every part of the package uses and that use none of them.

- :mod:`.io`: atomic file writes that never replace an earlier file silently, and free numbered names;
- :mod:`.logging`: hyperparameters and settings to Lightning's loggers;
- :mod:`.checks`: argument checks with messages that name the argument.

``flatq_lightning.utils`` imports nothing else of ``flatq_lightning`` (``tests/test_layers.py`` checks it).
"""
