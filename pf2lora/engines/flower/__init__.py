"""The Flower engine: the same methods and configs on Flower, simulated (``flower-sim``, Ray) or
deployed (``flower-deploy``: a SuperLink and one SuperNode per client), with the local engine's
numbers for the same seed.

Importing this package sets the offline environment Flower and Ray need (:mod:`.env`) before
either is imported. The heavy parts are imported on first use.
"""

from __future__ import annotations

from typing import Any

from pf2lora.engines.flower import env

env.apply()

__all__ = [
    "ENGINES",
    "FlowerEngineError",
    "FlowerServer",
    "MethodStrategy",
    "available",
    "make_client_app",
    "make_server_app",
    "run_flower_deploy",
    "run_flower_sim",
]

ENGINES = ("local", "flower-sim", "flower-deploy")
"""Engine names for ``pf2lora run --engine``."""


def available() -> bool:
    """Whether Flower (the ``pf2lora[flower]`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("flwr") is not None


def _require() -> None:
    if not available():
        from pf2lora.engines.flower.common import FlowerEngineError

        raise FlowerEngineError("the Flower engines need Flower: pip install 'pf2lora[flower]'")


def __getattr__(name: str) -> Any:
    if name == "FlowerEngineError":
        from pf2lora.engines.flower.common import FlowerEngineError

        return FlowerEngineError
    if name in ("FlowerServer", "MethodStrategy", "make_server_app", "make_client_app", "run_flower_sim", "run_flower_deploy"):
        _require()
    if name == "MethodStrategy":
        from pf2lora.engines.flower.strategy import MethodStrategy

        return MethodStrategy
    if name in ("FlowerServer", "make_server_app"):
        from pf2lora.engines.flower import server

        return getattr(server, name)
    if name == "make_client_app":
        from pf2lora.engines.flower.client import make_client_app

        return make_client_app
    if name == "run_flower_sim":
        from pf2lora.engines.flower.sim import run_flower_sim

        return run_flower_sim
    if name == "run_flower_deploy":
        from pf2lora.engines.flower.deploy import run_flower_deploy

        return run_flower_deploy
    raise AttributeError(name)
