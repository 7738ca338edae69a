"""Environment Flower and Ray need on a machine without internet, set before either is imported.

``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION`` matters most: without it a SuperLink runs a
dependency sync for the app that would try to pull packages (a CUDA torch). Every process this
engine starts gets the same variables (:func:`child_env`).
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps Ray on 127.0.0.1
}


def apply() -> None:
    """Set the variables in this process (a value the user set explicitly is kept)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process this engine starts: ours, the offline variables, ``extra``."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(extra)
    return env
