import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
# tests use tiny tensors: one intra-op thread avoids OpenMP oversubscription on shared 2-core machines
torch.set_num_threads(1)

try:  # the property tests draw the same examples on every run (CI must not pass or fail by chance);
    # FLATQ_HYPOTHESIS=explore draws fresh ones
    # neither profile has a wall-clock part: no per-example deadline, no "too slow" health check (both fail
    # by chance on a loaded machine)
    from hypothesis import HealthCheck, settings

    untimed = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("ci", derandomize=True, database=None, **untimed)
    settings.register_profile("explore", **untimed)
    settings.load_profile("explore" if os.environ.get("FLATQ_HYPOTHESIS") == "explore" else "ci")
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    pass


def pytest_addoption(parser):
    parser.addoption("--shuffle-seed", type=int, default=None,
                     help="run the collected tests in a random order drawn from this seed (flake hunting: "
                          "tests/flake_loop.sh -r); module fixtures may then be set up more than once")


def pytest_collection_modifyitems(config, items):
    seed = config.getoption("--shuffle-seed")
    if seed is not None:
        import random

        random.Random(seed).shuffle(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """3 classes, 4 training and 2 validation JPEGs each (40x48): the ImageNet path end to end, in seconds."""
    from tests.helpers import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("imagefolder") / "imagenet")
