"""deploy/rayservice.yaml cannot run here (no Kubernetes); what can be checked is: it is valid YAML,
its Serve config passes Ray Serve's own schema, its import path is the application `mace serve
--replicas` deploys, and the front end's command line is one `mace serve` accepts."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from mace.cli import _parser

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "rayservice.yaml"


def _documents() -> dict[str, Any]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def test_the_serve_config_passes_serves_schema_and_builds_mace() -> None:
    service = _documents()["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, name = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert int(app.args["replicas"]) >= 1


def test_the_front_end_attaches_to_the_deployed_replicas_with_a_command_mace_accepts() -> None:
    documents = _documents()
    cluster = documents["RayService"]["spec"]["rayClusterConfig"]
    containers = {c["name"]: c for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    command = containers["mace-front"]["command"]
    assert command[:2] == ["mace", "serve"]
    args = _parser().parse_args(command[1:])
    assert args.attach and args.replicas >= 1
    port = containers["mace-front"]["ports"][0]["containerPort"]
    assert args.port == port == documents["Service"]["spec"]["ports"][0]["targetPort"]
    labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert documents["Service"]["spec"]["selector"].items() <= labels.items()
    for group in cluster["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1  # one device per replica
    assert documents["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
