"""The replicas' Serve application, built one way for `mace serve --replicas N` and for a Serve
config (a KubeRay `RayService`, `serve deploy`): `import_path: mace.cluster.app:build`."""

from __future__ import annotations

from typing import Any, cast

import ray
from ray.serve import Application

from mace.cluster.replica import MaceReplica
from mace.config import MaceConfig, load_config

APP_NAME = "mace"
STOP_MARGIN_S = 30.0  # past the drain: the engine's stop and the trainer's last checkpoint


def replicas_app(config: MaceConfig, replicas: int, bind_host: str = "", log_level: str = "info") -> Application:
    """`replicas` replicas of the whole server, one device each (a GPU where the cluster has them);
    `bind_host` '' binds each replica's private port to its node's address."""
    gpus = ray.cluster_resources().get("GPU", 0) if config.model.device != "cpu" else 0
    options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if gpus >= 1 else 0}
    if config.model.num_threads == 0 and not options["num_gpus"]:
        # A share of the CPUs per replica: torch's default of every core per process would oversubscribe them.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"num_threads": max(1, cpus // replicas)})})
    deployment = cast(Any, MaceReplica).options(
        num_replicas=replicas, ray_actor_options=options,
        graceful_shutdown_timeout_s=config.server.drain_timeout_s + STOP_MARGIN_S)
    return cast(Application, deployment.bind(config, bind_host, log_level))


def build(args: dict[str, str]) -> Application:
    """Serve's application builder. `args`: `config` (a TOML file of overrides, as `mace serve
    --config`; MACE_* variables of the runtime env apply too), `replicas`, `log_level`."""
    config = load_config(args.get("config") or None, {})
    return replicas_app(config, int(args.get("replicas", 1)), "", args.get("log_level", "info"))
