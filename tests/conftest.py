import random
import sys
from pathlib import Path

import pytest

# tests import the float64 reference as a plain module
sys.path.insert(0, str(Path(__file__).parent))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Property tests draw from one seed per run, chosen here (or given with
    --hypothesis-seed) and printed in the header, so that a failure on CI
    replays anywhere."""
    if config.pluginmanager.hasplugin("hypothesis") and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2 ** 32))


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed", None)
    if seed is not None:
        return f"hypothesis seed {seed} (replay: python -m pytest --hypothesis-seed={seed})"
