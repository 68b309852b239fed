"""infra/: the cluster path (KubeRay, the MLflow server, the image) checked offline, no cluster.

* every YAML under infra/k8s and infra/mlflow parses (multi-document) and every object validates
  against its schema: Kubernetes v1.30 strict schemas (tests/schemas/kubernetes-v1.30.json,
  generated from the kubernetes-validate wheel by tests/schemas/make_kubernetes_schema.py),
  KubeRay ray.io/v1 RayCluster/RayJob/RayService (tests/schemas/kuberay-v1.json, from KubeRay's Go
  types),
  and the compose file against a subset of the Compose Specification (tests/schemas/compose-min.json);
* the Ray version of every `rayVersion`, every Ray image tag and the Dockerfile is the one
  pyproject.toml pins, and the MLflow server image is the pinned MLflow;
* every RayJob entrypoint names a script of the repo whose own `get_args_parser()` accepts its
  arguments, with a config, overrides and search space that load, and a `--workers` that equals
  the GPUs of its cluster (one Ray worker pod per GPU);
* every RayService's Serve config imports the repo's app builder with arguments it accepts, names
  its deployment, and fits its replicas on the cluster's GPU pods;
* every Ray cluster (RayCluster, RayJob, RayService) runs with Ray's token auth through KubeRay's
  `authOptions: {mode: token}`, nothing sets RAY_AUTH_* by hand or turns auth off, and
  docs/cluster.md has users create the Secret KubeRay reads and submit with its token;
* no committed file holds a password or secret key (a Ray token included) in plain text.

Each check is a function returning what is wrong; every check is also run on a corrupted copy
and must find the fault.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # >= 4.18 (its `referencing` registry); installed with ray, which requires it
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SCHEMAS = Path(__file__).with_name("schemas")
K8S_DIRS = (INFRA / "k8s", INFRA / "mlflow" / "k8s")
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
RAY_DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
ENV_EXAMPLE = INFRA / "mlflow" / "env.example"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
GPU = "nvidia.com/gpu"

K8S_FILES = sorted(p for d in K8S_DIRS for p in d.glob("*.y*ml"))
ALL_YAML = sorted({*K8S_FILES, COMPOSE})


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------------------------
# pyproject pins


def pinned_version(package: str) -> str:
    """The version pyproject.toml pins for ``package`` (``name[extras]==X``)."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: the dependency strings are simple enough
        deps = re.findall(r'^\s*"([^"]+)",', text, flags=re.MULTILINE)
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.+-]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {package}==X (the infra files must follow a pin)")


# --------------------------------------------------------------------------------------------
# YAML and schemas


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a (multi-document) YAML text; each must be a mapping."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise TypeError(f"a YAML document is a {type(doc).__name__}, not a mapping")
    return docs


@functools.cache
def _schemas() -> tuple[Any, dict[str, str]]:
    from referencing import Registry, Resource

    resources, kinds = [], {}
    for name in ("kubernetes-v1.30.json", "kuberay-v1.json", "compose-min.json"):
        schema = json.loads((SCHEMAS / name).read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
        for kind, definition in schema.get("x-kinds", {}).items():
            kinds[kind] = f"{schema['$id']}#/$defs/{definition}"
    return Registry().with_resources(resources), kinds


def _errors(schema_ref: str, instance: Any) -> list[str]:
    registry, _ = _schemas()
    validator = jsonschema.Draft202012Validator({"$ref": schema_ref}, registry=registry)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in validator.iter_errors(instance)]


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one Kubernetes object by the schema of its apiVersion/kind."""
    _, kinds = _schemas()
    key = f"{obj.get('apiVersion')}/{obj.get('kind')}"
    if key not in kinds:
        return [f"unknown apiVersion/kind {key} (known: {', '.join(sorted(kinds))})"]
    errors = _errors(kinds[key], obj)
    if not (obj.get("metadata") or {}).get("name"):
        errors.append("metadata.name is missing")
    return errors


def compose_errors(compose: dict[str, Any], env_names: set[str]) -> list[str]:
    """Schema errors of a compose file, plus dependencies on unknown services and variables
    that env.example does not define."""
    errors = _errors("https://ssd-ray.invalid/schemas/compose-min.json", compose)
    services = compose.get("services") or {}
    for name, service in services.items():
        depends = service.get("depends_on") or []
        for other in (depends if isinstance(depends, list) else depends.keys()):
            if other not in services:
                errors.append(f"services.{name}.depends_on: no service {other!r}")
    text = yaml.safe_dump(compose)
    for var in sorted(set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) - env_names):
        errors.append(f"${{{var}}} is not defined in {_rel(ENV_EXAMPLE)}")
    return errors


def env_example_names() -> set[str]:
    return {line.split("=", 1)[0].strip() for line in ENV_EXAMPLE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#") and "=" in line}


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, obj) for path in K8S_FILES for obj in load_documents(path.read_text())]


def objects_of(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, obj) for path, obj in all_objects() if obj["kind"] == kind]


# --------------------------------------------------------------------------------------------
# Ray clusters: versions, GPUs, CPUs


def cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayClusterSpec(s) of a RayCluster, RayJob or RayService."""
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayJob" and "rayClusterSpec" in obj["spec"]:
        return [obj["spec"]["rayClusterSpec"]]
    if obj["kind"] == "RayService" and "rayClusterConfig" in obj["spec"]:
        return [obj["spec"]["rayClusterConfig"]]
    return []


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay: the Ray container is the first


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("8", 8, "500m")."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def cluster_resources(spec: dict[str, Any]) -> dict[str, float]:
    """What Ray will see: CPUs and GPUs of the workers (pod limits) plus the head's num-cpus."""
    head = spec["headGroupSpec"]
    head_cpus = head["rayStartParams"].get("num-cpus")
    cpus = quantity(head_cpus) if head_cpus is not None else quantity(
        _ray_container(head["template"])["resources"]["limits"]["cpu"])
    gpus = 0.0
    for group in spec.get("workerGroupSpecs", []):
        limits = _ray_container(group["template"])["resources"]["limits"]
        cpus += group["replicas"] * quantity(limits["cpu"])
        gpus += group["replicas"] * quantity(limits.get(GPU, 0))
    return {"CPU": cpus, "GPU": gpus}


def worker_pod_cpus(spec: dict[str, Any]) -> float:
    return min(quantity(_ray_container(g["template"])["resources"]["limits"]["cpu"])
               for g in spec["workerGroupSpecs"])


def gpu_layout_errors(spec: dict[str, Any]) -> list[str]:
    """One Ray worker pod per GPU: every worker group is fixed-size, its Ray container has
    nvidia.com/gpu 1 in limits and requests (requests = limits for every resource), the head
    has no GPU and offers no CPU to Ray."""
    errors = []
    head = spec["headGroupSpec"]
    if GPU in _ray_container(head["template"]).get("resources", {}).get("limits", {}):
        errors.append("the head requests a GPU")
    if head["rayStartParams"].get("num-cpus") != "0":
        errors.append('the head must offer no CPU to Ray (rayStartParams num-cpus: "0")')
    if not spec.get("workerGroupSpecs"):
        errors.append("no worker group")
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        resources = _ray_container(group["template"]).get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if not group.get("replicas") or not group["replicas"] == group["minReplicas"] == group["maxReplicas"]:
            errors.append(f"group {name}: replicas, minReplicas and maxReplicas must be equal (fixed size)")
        if GPU not in limits or quantity(limits[GPU]) != 1:
            errors.append(f"group {name}: limits {GPU} must be 1 (one Ray worker pod per GPU), got {limits.get(GPU)}")
        if {k: str(v) for k, v in requests.items()} != {k: str(v) for k, v in limits.items()}:
            errors.append(f"group {name}: requests {requests} differ from limits {limits}")
        for key in ("num-gpus", "num-cpus"):
            if key in group["rayStartParams"]:
                errors.append(f"group {name}: rayStartParams {key} overrides what the pod limits give Ray")
    return errors


def ray_version_errors(objects: list[dict[str, Any]], dockerfile: str, pin: str) -> list[str]:
    """Every rayVersion, Ray pod image tag and the Dockerfile's Ray must be ``pin``."""
    errors = []
    for obj in objects:
        for spec in cluster_specs(obj):
            where = f"{obj['kind']} {obj['metadata']['name']}"
            if str(spec.get("rayVersion")) != pin:
                errors.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != {pin}")
            groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
            for group in groups:
                for container in group["template"]["spec"]["containers"]:
                    tag = container["image"].rsplit(":", 1)[-1] if ":" in container["image"] else ""
                    if not re.fullmatch(rf"{re.escape(pin)}(-[\w.]+)?", tag):
                        errors.append(f"{where}: image {container['image']} is not tagged with Ray {pin}")
    arg = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, flags=re.MULTILINE)
    if arg is None or arg.group(1) != pin:
        errors.append(f"Dockerfile: ARG RAY_VERSION={arg.group(1) if arg else None} != {pin}")
    if not re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, flags=re.MULTILINE):
        errors.append("Dockerfile: not FROM rayproject/ray:${RAY_VERSION}-...")
    if "ray.__version__ == '${RAY_VERSION}'" not in dockerfile:
        errors.append("Dockerfile: the build does not check the installed Ray version")
    return errors


def dockerfile_workdir(dockerfile: str) -> str:
    return re.findall(r"^WORKDIR (\S+)$", dockerfile, flags=re.MULTILINE)[-1]


# --------------------------------------------------------------------------------------------
# Entrypoints


@functools.cache
def pipeline_module(script: str) -> Any:
    """Import pipelines/<script> by path (it sets up its own sys.path)."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"_infra_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BadEntrypoint(Exception):
    pass


def parse_entrypoint(entrypoint: str) -> tuple[str, Any]:
    """``python pipelines/X.py ARGS`` -> (script, args parsed by X's own get_args_parser())."""
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] not in ("python", "python3"):
        raise BadEntrypoint(f"not `python SCRIPT ...`: {entrypoint!r}")
    script = argv[1]
    if not script.startswith("pipelines/") or not (ROOT / script).is_file():
        raise BadEntrypoint(f"{script}: no such pipeline script in the repository")
    parser = pipeline_module(script).get_args_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv[2:])
    except SystemExit as err:  # argparse reports some errors by exiting even so
        raise BadEntrypoint(f"{script} refuses its arguments {argv[2:]} (exit {err.code})") from None
    except Exception as err:  # noqa: BLE001 - argparse.ArgumentError and friends
        raise BadEntrypoint(f"{script} refuses its arguments: {err}") from None
    return script, args


def _shared_mounts(spec: dict[str, Any]) -> list[str]:
    """Mount paths of PVC volumes mounted in the head and in every worker group's Ray container."""
    def pvc_mounts(template: dict[str, Any]) -> set[str]:
        pvcs = {v["name"] for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        return {m["mountPath"] for m in _ray_container(template).get("volumeMounts", []) if m["name"] in pvcs}

    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    common = set.intersection(*(pvc_mounts(g["template"]) for g in groups))
    return sorted(common)


def _location_error(flag: str, value: str | None, spec: dict[str, Any], s3_ok: bool) -> str | None:
    """A data or storage location every pod can read: s3:// (when the script takes URLs there)
    or a path on a volume mounted in all pods."""
    if value is None:
        return f"{flag} is not given: the default is a folder inside the pod, lost with it"
    if value.startswith("s3://"):
        return None if s3_ok else f"{flag} {value}: this script joins folder paths here, s3:// is not supported"
    if "://" in value:
        return f"{flag} {value}: only s3:// URLs or shared-volume paths are set up"
    if not any(value == m or value.startswith(m.rstrip("/") + "/") for m in _shared_mounts(spec)):
        return f"{flag} {value}: not on a volume every pod mounts ({_shared_mounts(spec) or 'none'})"
    return None


def entrypoint_errors(job: dict[str, Any], workdir: str) -> list[str]:
    """What is wrong with a RayJob's command for the cluster it brings."""
    spec = job["spec"]
    try:
        script, args = parse_entrypoint(spec["entrypoint"])
    except BadEntrypoint as err:
        return [str(err)]
    from ssd.config import ConfigError, load_config

    errors = []
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    if runtime_env.get("working_dir") != workdir:
        errors.append(f"runtimeEnvYAML working_dir {runtime_env.get('working_dir')!r} is not the image's "
                      f"project folder {workdir} (relative script paths would not resolve)")
    cluster = spec["rayClusterSpec"]
    resources = cluster_resources(cluster)
    gpus, pod_cpus = int(resources["GPU"]), worker_pod_cpus(cluster)

    def config_error(name: str | None, overrides: list[str]) -> None:
        try:
            load_config(name or "tiny", list(overrides))
        except (ConfigError, FileNotFoundError, ValueError) as err:
            errors.append(f"config {name} {overrides}: {err}")

    if script == "pipelines/tune.py":
        from ssd.distributed.trainer import Scaling
        from ssd.distributed.tune import max_concurrent_trials
        from ssd.search_space import SearchSpace, SpaceError

        config_error(args.config, args.overrides)
        try:
            SearchSpace.load(ROOT / args.space, load_config(args.config or "tiny"))
        except (SpaceError, ConfigError, OSError, TypeError) as err:
            errors.append(f"--space {args.space}: {err}")
        if not args.gpu:
            errors.append("--gpu is missing: the trials would train on CPU")
        if args.workers_per_trial > gpus:
            errors.append(f"--workers-per-trial {args.workers_per_trial} > the cluster's {gpus} GPUs")
        if args.cpus_per_worker > pod_cpus:
            errors.append(f"--cpus-per-worker {args.cpus_per_worker} > a worker pod's {pod_cpus} CPUs")
        fit = max_concurrent_trials(Scaling(args.workers_per_trial, True, args.cpus_per_worker), resources)
        if args.max_concurrent and args.max_concurrent > fit:
            errors.append(f"--max-concurrent {args.max_concurrent} > the {fit} trials the cluster holds")
        errors.append(_location_error("--data", args.data, cluster, s3_ok=True))
        errors.append(_location_error("--storage-path", args.storage_path, cluster, s3_ok=True))
    else:
        if script == "pipelines/pretrain_finetune.py":
            from ssd.jobs.pretrain_finetune import PipelineRequest

            try:  # a two-stage recipe names each stage's preset and overrides
                stages = PipelineRequest(config=args.config, pretrain=tuple(args.pretrain),
                                         finetune=tuple(args.finetune)).stage_configs()
            except (ConfigError, FileNotFoundError, ValueError) as err:
                stages = ()
                errors.append(f"config {args.config}: {err}")
            for name, overrides in stages:
                config_error(name, list(overrides))
            locations = [("--coco-data", args.coco_data, True), ("--voc-data", args.voc_data, True)]
        elif script == "pipelines/train.py":
            config_error(args.config, args.overrides)
            train = args.train or (f"{args.data}/train" if args.data else None)
            val = args.val or (f"{args.data}/val" if args.data else None)
            locations = [("--train", train, True), ("--val", val, True)]
            from ssd.jobs.common import loader_workers_for

            if args.cpus_per_worker + loader_workers_for(args.loader_workers, True, args.cpus_per_worker) > pod_cpus:
                errors.append(f"--cpus-per-worker + --loader-workers > a worker pod's {pod_cpus} CPUs")
        else:
            return [f"{script}: no RayJob check for this script"]
        if args.use_gpu is not True:
            errors.append("--gpu is missing: one training worker per GPU needs it")
        if args.workers != gpus:
            errors.append(f"--workers {args.workers} != the cluster's GPUs {gpus} "
                          f"(worker replicas x {GPU} per pod)")
        if args.cpus_per_worker > pod_cpus:
            errors.append(f"--cpus-per-worker {args.cpus_per_worker} > a worker pod's {pod_cpus} CPUs")
        for flag, value, s3_ok in [*locations, ("--storage-path", args.storage_path, True)]:
            errors.append(_location_error(flag, value, cluster, s3_ok))
    return [e for e in errors if e]


# --------------------------------------------------------------------------------------------
# RayService: the Serve config


def serve_config_errors(service: dict[str, Any]) -> list[str]:
    """What is wrong with a RayService's ``serveConfigV2`` for the repo and the cluster it brings:
    each application's ``import_path`` must resolve to ``ssd.distributed.serve_app.app_builder``
    and its ``args`` be accepted by it (``ssd.endpoint.settings_from_args``) with a registry model
    (a path would be one inside the pod); deployments must be the app's own, one GPU per replica,
    the replicas within the GPU pods and their CPUs within a pod."""
    from ray.serve import Application

    from ssd.distributed import serve_app
    from ssd.endpoint import settings_from_args
    from ssd.registry import is_model_uri

    try:
        config = yaml.safe_load(service["spec"].get("serveConfigV2") or "") or {}
    except yaml.YAMLError as err:
        return [f"serveConfigV2 is not YAML: {err}"]
    cluster = service["spec"]["rayClusterConfig"]
    gpus, pod_cpus = int(cluster_resources(cluster)["GPU"]), worker_pod_cpus(cluster)
    errors, replicas = [], 0
    applications = config.get("applications") or []
    if not applications:
        errors.append("serveConfigV2 has no application")
    for app in applications:
        name = app.get("name")
        module, _, attribute = str(app.get("import_path", "")).partition(":")
        try:
            builder = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError) as err:
            errors.append(f"app {name}: import_path {app.get('import_path')!r} does not resolve ({err})")
            builder = None
        if builder is not None and builder is not serve_app.app_builder:
            errors.append(f"app {name}: import_path {app.get('import_path')!r} is not "
                          "ssd.distributed.serve_app:app_builder")
        try:
            settings = settings_from_args(app.get("args") or {})
            if not is_model_uri(settings.model):
                errors.append(f"app {name}: args.model {settings.model!r} is not a registry model (models:/...)")
            if builder is serve_app.app_builder and not isinstance(builder(dict(app.get("args") or {})), Application):
                errors.append(f"app {name}: the builder returns no Serve application")
        except (ValueError, TypeError) as err:
            errors.append(f"app {name}: args: {err}")
        for deployment in app.get("deployments") or []:
            if deployment.get("name") != serve_app.DEPLOYMENT:
                errors.append(f"app {name}: no deployment {deployment.get('name')!r} (it is {serve_app.DEPLOYMENT})")
            options = deployment.get("ray_actor_options") or {}
            if options.get("num_gpus") != 1:
                errors.append(f"app {name}: num_gpus {options.get('num_gpus')} != 1 (one replica per GPU pod)")
            if float(options.get("num_cpus", 1)) > pod_cpus:
                errors.append(f"app {name}: num_cpus {options.get('num_cpus')} > a worker pod's {pod_cpus:g} CPUs")
            replicas += int(deployment.get("num_replicas", 1))
    if replicas > gpus:
        errors.append(f"{replicas} replicas of one GPU each > the cluster's {gpus} GPU pods")
    return errors


# --------------------------------------------------------------------------------------------
# Secrets

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY", re.IGNORECASE)
# KEY=VALUE / KEY: VALUE with an upper-case secret-like key, or a plain lower-case one
ASSIGNMENT = re.compile(r"\b([A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET_ACCESS_KEY|SECRET_KEY|TOKEN|PRIVATE_KEY)[A-Z0-9_]*"
                        r"|password|passwd|secret|token)\s*[:=]\s*(\S*)")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]+)@")
SAFE_VALUE = ("$", "<", "{", "CHANGE_ME")


def _literal(value: Any) -> bool:
    """A value that is itself a secret rather than a reference or placeholder."""
    text = str(value).strip().strip("'\"")
    return bool(text) and not text.startswith(SAFE_VALUE)


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def secret_findings(path: Path, text: str) -> list[str]:
    """Plain-text secrets in one file: literal values of secret-like keys (env vars, compose
    environment, kubectl --from-literal, KEY=VALUE lines), passwords inside URLs, Secret objects
    with data. References ($VAR, $(VAR), ${VAR}, secretKeyRef) and CHANGE_ME placeholders pass."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for key, value in ASSIGNMENT.findall(line):
            if _literal(value):
                found.append(f"{path.name}:{number}: {key} has a literal value")
        for password in URL_PASSWORD.findall(line):
            if _literal(password):
                found.append(f"{path.name}:{number}: a password inside a URL")
    if path.suffix in (".yaml", ".yml"):
        try:
            docs = load_documents(text)
        except (yaml.YAMLError, TypeError):
            docs = []
        for doc in docs:
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                found.append(f"{path.name}: a Secret with its data (create it with kubectl, do not commit it)")
            if doc.get("kind") == "ConfigMap":
                found += [f"{path.name}: ConfigMap key {k} looks secret" for k in doc.get("data") or {}
                          if SECRET_NAME.search(k)]
            for node in _walk(doc):
                if {"name", "value"} <= node.keys() and isinstance(node["name"], str) \
                        and SECRET_NAME.search(node["name"]) and _literal(node["value"]):
                    found.append(f"{path.name}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
            for service in (doc.get("services") or {}).values() if isinstance(doc.get("services"), dict) else []:
                env = service.get("environment") or {}
                pairs = env.items() if isinstance(env, dict) else (item.split("=", 1) for item in env if "=" in item)
                found += [f"{path.name}: compose environment {k} has a literal value" for k, v in pairs
                          if SECRET_NAME.search(k) and _literal(v)]
    return sorted(set(found))


def committed_files() -> list[Path]:
    """Files under infra/ plus the cluster guide and the test schemas, without git-ignored ones
    (the .env of infra/mlflow holds real credentials by design)."""
    files = [p for p in sorted(INFRA.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    files += [CLUSTER_DOC, *sorted(SCHEMAS.glob("*"))]
    if shutil.which("git") and (ROOT / ".git").exists():
        rel = [_rel(p) for p in files]
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--stdin"], input="\n".join(rel),
                                 capture_output=True, text=True, check=False).stdout.split()
        files = [p for p in files if _rel(p) not in set(ignored)]
    else:
        files = [p for p in files if p.name != ".env"]
    return [p for p in files if p.is_file()]


# --------------------------------------------------------------------------------------------
# Ray token authentication
#
# Ray 2.60 (ray/_private/authentication/): RAY_AUTH_MODE=token turns it on in the GCS, raylets,
# agents and the dashboard; the token is RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
# ~/.ray/auth_token; HTTP clients send "Authorization: Bearer <token>" (401 without, 403 wrong), and
# `ray job submit` sends it only when RAY_AUTH_MODE=token is in its own environment.
# KubeRay 1.5.1: `authOptions: {mode: token}` makes the operator add RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN (secretKeyRef: the Secret named after the RayCluster, key auth_token; created with a
# random token when missing) to the head, workers, wait-gcs-ready init containers and a RayJob's
# submitter, and send the token on its own dashboard calls (a RayJob's status). Variables set by
# hand in the pod templates reach neither the submitter nor the operator: they are refused here.

RAY_AUTH_ENV = frozenset({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"})
AUTH_TOKEN_KEY = "auth_token"      # KubeRay utils.RAY_AUTH_TOKEN_SECRET_KEY
MIN_RAY_FOR_TOKEN_AUTH = "2.52.0"  # KubeRay refuses authOptions.mode token below it
MIN_KUBERAY_FOR_AUTH = "1.5.1"     # the first KubeRay with authOptions
AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE['\"]?\s*[:=]\s*['\"]?disabled", re.IGNORECASE)


def _version(text: Any) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(text))[:3])


def kuberay_auth_secret(cluster_name: str) -> str:
    """The Secret KubeRay 1.5.1 takes the token from: utils.CheckName(<RayCluster name>)."""
    name = cluster_name[-50:]
    return "r" + name[1:] if not name[0].isalpha() else name


def _configmap_data() -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: {str(k): str(v) for k, v in (o.get("data") or {}).items()}
            for _, o in objects_of("ConfigMap")}


def ray_auth_errors(obj: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> list[str]:
    """What keeps a RayCluster/RayJob from running every Ray process with token auth: no
    `authOptions.mode: token`, a Ray too old for it, or RAY_AUTH_* set by hand in a pod template
    (env or an envFrom ConfigMap), where it would shadow or fight what KubeRay sets."""
    where = f"{obj['kind']} {obj['metadata']['name']}"
    errors, templates = [], []
    specs = cluster_specs(obj)
    if obj["kind"] == "RayJob" and not specs and not obj["spec"].get("clusterSelector"):
        errors.append(f"{where}: neither rayClusterSpec nor clusterSelector")
    for spec in specs:
        mode = (spec.get("authOptions") or {}).get("mode")
        if mode != "token":
            errors.append(f"{where}: authOptions.mode is {mode!r}, not 'token': anyone who reaches the "
                          f"head could run code")
        if _version(spec.get("rayVersion", "0")) < _version(MIN_RAY_FOR_TOKEN_AUTH):
            errors.append(f"{where}: rayVersion {spec.get('rayVersion')!r} < {MIN_RAY_FOR_TOKEN_AUTH} "
                          f"(KubeRay refuses token auth)")
        templates += [(group.get("groupName", "head"), group["template"])
                      for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]
    if obj["kind"] == "RayJob" and obj["spec"].get("submitterPodTemplate"):
        templates.append(("submitter", obj["spec"]["submitterPodTemplate"]))
    for group, template in templates:
        pod = template.get("spec") or {}
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            name = f"{where} {group}/{container.get('name')}"
            for env in container.get("env") or []:
                if env.get("name") in RAY_AUTH_ENV:
                    errors.append(f"{name}: sets {env['name']} by hand; authOptions has KubeRay set "
                                  f"RAY_AUTH_MODE and RAY_AUTH_TOKEN (from a Secret)")
            for source in container.get("envFrom") or []:
                ref = (source.get("configMapRef") or {}).get("name")
                keys = {source.get("prefix", "") + key for key in configmaps.get(ref, {})}
                errors += [f"{name}: ConfigMap {ref} sets {key}; leave RAY_AUTH_* to authOptions"
                           for key in sorted(keys & RAY_AUTH_ENV)]
    return errors


def auth_disabled_findings(path: Path, text: str) -> list[str]:
    """Places that turn Ray's token auth off: RAY_AUTH_MODE=disabled (any spelling of the
    assignment, in any file), an env var or ConfigMap key RAY_AUTH_MODE other than token, and
    authOptions.mode disabled."""
    found = [f"{path.name}:{n}: RAY_AUTH_MODE disabled" for n, line in enumerate(text.splitlines(), 1)
             if AUTH_DISABLED.search(line)]
    if path.suffix in (".yaml", ".yml"):
        for doc in load_documents(text):
            if doc.get("kind") == "ConfigMap" and "RAY_AUTH_MODE" in (doc.get("data") or {}) \
                    and str(doc["data"]["RAY_AUTH_MODE"]) != "token":
                found.append(f"{path.name}: ConfigMap RAY_AUTH_MODE={doc['data']['RAY_AUTH_MODE']}")
            for node in _walk(doc):
                if node.get("name") == "RAY_AUTH_MODE" and "value" in node and str(node["value"]) != "token":
                    found.append(f"{path.name}: env RAY_AUTH_MODE={node['value']}")
                if isinstance(node.get("authOptions"), dict) and node["authOptions"].get("mode") != "token":
                    found.append(f"{path.name}: authOptions.mode {node['authOptions'].get('mode')!r}")
    return found


def doc_auth_errors(text: str, secret: str) -> list[str]:
    """The guide must have users create the Secret KubeRay reads (``secret``, key auth_token) with
    a generated token, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN read from that Secret before
    the first `ray job submit`, show that a request without the token is refused, and install a
    KubeRay that knows authOptions."""
    commands = doc_commands(text)
    errors = []
    created = []
    for command in commands:
        words = shlex.split(command)
        if "create" in words and "secret" in words and "generic" in words:
            name = words[words.index("generic") + 1]
            created += [(name, *w.split("=", 2)[1:]) for w in words if w.startswith("--from-literal=")]
    ours = [(key, value) for name, key, value in created if name == secret]
    if not any(key == AUTH_TOKEN_KEY for key, _ in ours):
        errors.append(f"no `kubectl create secret generic {secret} --from-literal={AUTH_TOKEN_KEY}=...` "
                      f"(the Secret KubeRay reads the token of the RayCluster from); created: {created}")
    errors += [f"the token of {secret} is written in the guide ({value!r}): generate it, e.g. "
               f"$(openssl rand -hex 32)" for key, value in ours if key == AUTH_TOKEN_KEY and not value.startswith("$")]
    submits = [i for i, c in enumerate(commands) if re.search(r"\bray job submit\b", c)]
    first = submits[0] if submits else len(commands)
    before = commands[:first]
    if not any(re.search(r"\bRAY_AUTH_MODE=token\b", c) for c in before if c.startswith("export ")):
        errors.append("no `export RAY_AUTH_MODE=token` before `ray job submit` (without it, ray sends no token)")
    reads = [re.search(r"\bRAY_AUTH_TOKEN=\"?\$\(kubectl .*\bget secret (\S+) .*\{\.data\.(\w+)\}", c)
             for c in before if c.startswith("export ")]
    if not any(m and m.group(1) == secret and m.group(2) == AUTH_TOKEN_KEY for m in reads):
        errors.append(f"no `export RAY_AUTH_TOKEN=$(kubectl get secret {secret} ... {{.data.{AUTH_TOKEN_KEY}}} ...)` "
                      f"before `ray job submit`")
    if not any(c.startswith("curl ") and ":8265/" in c and "Authorization" not in c for c in commands) \
            or "401" not in text:
        errors.append("the guide does not show a request without the token being refused (401)")
    helm = [re.search(r"--version (\d+\.\d+\.\d+)", c) for c in commands if c.startswith("helm install kuberay")]
    if not helm or any(m is None or _version(m.group(1)) < _version(MIN_KUBERAY_FOR_AUTH) for m in helm):
        errors.append(f"the KubeRay chart must be >= {MIN_KUBERAY_FOR_AUTH} (authOptions)")
    errors += auth_disabled_findings(Path("cluster.md"), text)
    return errors


# ============================================================================================
# Tests


def test_there_are_manifests():
    names = {_rel(p) for p in K8S_FILES}
    for expected in ("infra/k8s/raycluster.yaml", "infra/k8s/rayjob-train.yaml", "infra/k8s/rayjob-tune.yaml",
                     "infra/k8s/rayjob-pretrain-finetune.yaml", "infra/k8s/rayservice-serve.yaml",
                     "infra/mlflow/k8s/mlflow.yaml"):
        assert expected in names
    assert {obj["kind"] for _, obj in all_objects()} >= {
        "RayCluster", "RayJob", "RayService", "Deployment", "StatefulSet", "Service", "Job", "ConfigMap", "PersistentVolumeClaim"}


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_yaml_parses(path):
    docs = load_documents(path.read_text())
    assert docs, f"{_rel(path)} has no document"


def test_yaml_parse_rejects_broken_text():
    text = (INFRA / "k8s" / "raycluster.yaml").read_text()
    with pytest.raises(yaml.YAMLError):
        load_documents(text.replace("  rayVersion:", "rayVersion:\n   - [", 1))
    with pytest.raises(TypeError):
        load_documents("---\n- a list\n---\nkind: ConfigMap\n")


@pytest.mark.parametrize("path", K8S_FILES, ids=_rel)
def test_manifest_objects_validate(path):
    for obj in load_documents(path.read_text()):
        assert schema_errors(obj) == [], f"{_rel(path)}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}"


def _raycluster() -> dict[str, Any]:
    return copy.deepcopy(objects_of("RayCluster")[0][1])


def _first_of(kind: str) -> dict[str, Any]:
    return copy.deepcopy(objects_of(kind)[0][1])


def _misspell_replicas(o):
    o["spec"]["workerGroupSpecs"][0]["replica"] = o["spec"]["workerGroupSpecs"][0].pop("replicas")


def _unquoted_num_cpus(o):
    o["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _misspell_resources(o):
    container = o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")


def _no_template(o):
    del o["spec"]["headGroupSpec"]["template"]


def _ray_v2(o):
    o["apiVersion"] = "ray.io/v2"


CORRUPTIONS = {
    "misspelt replicas": (_raycluster, _misspell_replicas),
    "num-cpus not a string": (_raycluster, _unquoted_num_cpus),
    "misspelt container resources": (_raycluster, _misspell_resources),
    "head without template": (_raycluster, _no_template),
    "unknown apiVersion": (_raycluster, _ray_v2),
    "RayJob unknown spec key": (lambda: _first_of("RayJob"), lambda o: o["spec"].update(entryPoint="x")),
    "RayJob bad submissionMode": (lambda: _first_of("RayJob"), lambda o: o["spec"].update(submissionMode="Batch")),
    "Deployment without selector": (lambda: _first_of("Deployment"), lambda o: o["spec"].pop("selector")),
    "Service port as text": (lambda: _first_of("Service"),
                             lambda o: o["spec"]["ports"][0].update(port="five thousand")),
    "Job backoffLimit as text": (lambda: _first_of("Job"), lambda o: o["spec"].update(backoffLimit="ten")),
    "Job container args not a list": (lambda: _first_of("Job"),
                                      lambda o: o["spec"]["template"]["spec"]["containers"][0].update(args="x")),
    "StatefulSet env valueFrom typo": (
        lambda: _first_of("StatefulSet"),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["env"][0].update(valueFrom={"secretRef": {}})),
    "no name": (lambda: _first_of("ConfigMap"), lambda o: o["metadata"].pop("name")),
    "authOptions bad mode": (_raycluster, lambda o: o["spec"].update(authOptions={"mode": "tokens"})),
    "RayService unknown spec key": (lambda: _first_of("RayService"), lambda o: o["spec"].update(serveConfig="x")),
    "RayService rayClusterSpec (a RayJob's name)": (
        lambda: _first_of("RayService"), lambda o: o["spec"].update(rayClusterSpec=o["spec"].pop("rayClusterConfig"))),
    "authOptions secretName (KubeRay 1.6)": (
        lambda: _first_of("RayJob"),
        lambda o: o["spec"]["rayClusterSpec"]["authOptions"].update(secretName="ssd-ray")),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_validation_rejects_a_corrupted_manifest(corruption):
    make, corrupt = CORRUPTIONS[corruption]
    obj = make()
    assert schema_errors(obj) == []
    corrupt(obj)
    assert schema_errors(obj), f"the schema let through: {corruption}"


def test_schema_refs_all_resolve():
    registry, kinds = _schemas()
    resolver = registry.resolver()
    for name in ("kubernetes-v1.30.json", "kuberay-v1.json", "compose-min.json"):
        schema = json.loads((SCHEMAS / name).read_text())
        base = registry.resolver(base_uri=schema["$id"])
        for node in _walk(schema):
            if isinstance(node.get("$ref"), str):
                base.lookup(node["$ref"])  # raises if the reference leads nowhere
    for ref in kinds.values():
        resolver.lookup(ref)
    from referencing.exceptions import Unresolvable

    with pytest.raises(Unresolvable):
        registry.resolver(base_uri="https://ssd-ray.invalid/schemas/kuberay-v1.json").lookup(
            "kubernetes-v1.30.json#/$defs/io.k8s.api.core.v1.NoSuchThing")


def test_compose_file_validates():
    compose = load_documents(COMPOSE.read_text())[0]
    assert compose_errors(compose, env_example_names()) == []
    assert set(compose["services"]) == {"postgres", "minio", "create-buckets", "mlflow"}
    # every variable env.example defines is used by the compose file
    assert env_example_names() <= set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))


@pytest.mark.parametrize("corrupt", [
    lambda c: c["services"]["mlflow"].update(enviroment={}),
    lambda c: c["services"]["mlflow"]["depends_on"].update(redis={"condition": "service_healthy"}),
    lambda c: c["services"]["mlflow"]["depends_on"]["postgres"].update(condition="healthy"),
    lambda c: c["services"]["postgres"]["environment"].update(PGPASSWORD="${UNDEFINED_VAR}"),
    lambda c: c["services"]["minio"]["healthcheck"].update(retries="many"),
], ids=["misspelt key", "unknown service", "bad condition", "variable not in env.example", "bad type"])
def test_compose_check_rejects_a_corrupted_file(corrupt):
    compose = load_documents(COMPOSE.read_text())[0]
    corrupt(compose)
    assert compose_errors(compose, env_example_names())


def test_ray_version_everywhere_is_the_pinned_one():
    pin = pinned_version("ray")
    objects = [obj for _, obj in all_objects()]
    assert sum(len(cluster_specs(o)) for o in objects) >= 4
    assert ray_version_errors(objects, RAY_DOCKERFILE.read_text(), pin) == []
    # and the check sees a mismatch
    assert ray_version_errors(objects, RAY_DOCKERFILE.read_text(), "2.59.0")
    bumped = copy.deepcopy(objects)
    next(o for o in bumped if o["kind"] == "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] = "2.61.0"
    assert any("rayVersion" in e for e in ray_version_errors(bumped, RAY_DOCKERFILE.read_text(), pin))
    assert ray_version_errors(objects, RAY_DOCKERFILE.read_text().replace(f"RAY_VERSION={pin}", "RAY_VERSION=2.9.0"),
                              pin)


def test_dockerfile_installs_the_pinned_torch_for_the_chosen_device():
    text = RAY_DOCKERFILE.read_text()
    # the Dockerfile reads the torch/torchvision pins from pyproject.toml by splitting on "=="
    for package in ("torch", "torchvision"):
        assert pinned_version(package)
    assert 'tomllib.load(open("pyproject.toml", "rb"))' in text and '("torch", "torchvision")' in text
    assert "https://download.pytorch.org/whl/" in text and "echo cpu" in text
    assert re.search(r"^ARG DEVICE=gpu$", text, flags=re.MULTILINE) and re.search(r"^ARG TORCH_CUDA=cu\d+$", text, flags=re.MULTILINE)
    assert re.search(r"^ARG PYTHON_TAG=py311$", text, flags=re.MULTILINE)  # the Ray image's Python
    ignore = (RAY_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "**/.env"} <= set(ignore)


def test_image_holds_what_the_jobs_run():
    """The RayJobs run from the image's project folder: it must hold the scripts and the files
    their arguments name (only listed folders are copied into the image)."""
    copied = set()
    for line in re.findall(r"^COPY (?:--chown=\S+ )?(.+)$", RAY_DOCKERFILE.read_text(), flags=re.MULTILINE):
        copied.update(Path(part).parts[0] for part in line.split()[:-1])
    assert {"pyproject.toml", "README.md", "ssd", "pipelines", "tune_spaces"} <= copied
    for _, job in _jobs():
        for word in shlex.split(job["spec"]["entrypoint"]):
            if re.match(r"(pipelines|tune_spaces|ssd)/", word):
                assert word.split("/")[0] in copied and (ROOT / word).is_file(), word


def mlflow_version_errors(dockerfile: str, images: list[str], pin: str) -> list[str]:
    """The MLflow server image: the official image of the pinned MLflow, with the PostgreSQL and
    S3 clients, tagged with that version wherever it is used."""
    errors = []
    if not re.search(rf"^ARG MLFLOW_VERSION={re.escape(pin)}$", dockerfile, flags=re.MULTILINE):
        errors.append(f"infra/mlflow/Dockerfile: ARG MLFLOW_VERSION is not {pin}")
    if "FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}" not in dockerfile:
        errors.append("infra/mlflow/Dockerfile: not FROM the official image of MLFLOW_VERSION")
    if not re.search(r"pip install .*psycopg2-binary==.*boto3==", dockerfile):
        errors.append("infra/mlflow/Dockerfile: psycopg2 and boto3 are not installed (pinned)")
    if not images:
        errors.append("no MLflow server image in the manifests")
    errors += [f"{image} is not tagged {pin}" for image in images if not image.endswith(f":{pin}")]
    return errors


def test_mlflow_server_image_is_the_pinned_mlflow():
    pin = pinned_version("mlflow")
    images = [c["image"] for _, o in objects_of("Deployment") for c in o["spec"]["template"]["spec"]["containers"]
              if "mlflow" in c["image"]]
    images.append(load_documents(COMPOSE.read_text())[0]["services"]["mlflow"]["image"])
    dockerfile = MLFLOW_DOCKERFILE.read_text()
    assert mlflow_version_errors(dockerfile, images, pin) == []
    assert len(mlflow_version_errors(dockerfile, images, "3.18.0")) == 1 + len(images)
    assert mlflow_version_errors(dockerfile.replace("psycopg2-binary", "pg8000"), images, pin)


def _clusters() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{_rel(p)}:{o['metadata']['name']}", spec) for p, o in all_objects() for spec in cluster_specs(o)]


@pytest.mark.parametrize("where,spec", _clusters(), ids=[w for w, _ in _clusters()])
def test_one_ray_worker_pod_per_gpu(where, spec):
    assert gpu_layout_errors(spec) == []
    assert cluster_resources(spec)["GPU"] >= 1


@pytest.mark.parametrize("corrupt", [
    lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {GPU: 2}),
    lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"].pop(GPU),
    lambda s: s["workerGroupSpecs"][0].update(maxReplicas=8),
    lambda s: s["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
    lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": "2"}),
], ids=["2 GPUs per pod", "requests != limits", "autoscaling group", "head offers CPUs", "num-gpus override"])
def test_gpu_layout_check_rejects_a_corrupted_cluster(corrupt):
    spec = copy.deepcopy(_raycluster()["spec"])
    corrupt(spec)
    assert gpu_layout_errors(spec)


def _jobs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{_rel(p)}", o) for p, o in objects_of("RayJob")]


@pytest.mark.parametrize("where,job", _jobs(), ids=[w for w, _ in _jobs()])
def test_rayjob_entrypoint_runs_a_repo_script_that_accepts_it(where, job):
    assert entrypoint_errors(job, dockerfile_workdir(RAY_DOCKERFILE.read_text())) == []


def _services() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{_rel(p)}", o) for p, o in objects_of("RayService")]


@pytest.mark.parametrize("where,service", _services(), ids=[w for w, _ in _services()])
def test_rayservice_serves_the_repo_app_on_its_cluster(where, service):
    assert serve_config_errors(service) == []


def _edit_serve_config(before: str, after: str):
    def corrupt(service):
        text = service["spec"]["serveConfigV2"]
        assert before in text, before
        service["spec"]["serveConfigV2"] = text.replace(before, after)
    return corrupt


SERVE_CORRUPTIONS = {
    "unknown arg": _edit_serve_config("reload_seconds:", "reload_secs:"),
    "import path nowhere": _edit_serve_config("serve_app:app_builder", "serve_app:builder"),
    "another callable": _edit_serve_config("serve_app:app_builder", "serve_app:build_app"),
    "model as a path": _edit_serve_config("model: models:/ssd-voc@champion", "model: /models/best"),
    "deployment name": _edit_serve_config("- name: SSDEndpoint", "- name: Detector"),
    "more replicas than GPU pods": _edit_serve_config("num_replicas: 2", "num_replicas: 3"),
    "two GPUs a replica": _edit_serve_config("num_gpus: 1", "num_gpus: 2"),
    "more CPUs than a pod": _edit_serve_config("num_cpus: 4", "num_cpus: 16"),
    "not YAML": _edit_serve_config("applications:", "applications: [\n"),
}


@pytest.mark.parametrize("corruption", SERVE_CORRUPTIONS)
def test_serve_config_check_rejects_a_corrupted_service(corruption):
    service = _first_of("RayService")
    assert serve_config_errors(service) == []
    SERVE_CORRUPTIONS[corruption](service)
    assert serve_config_errors(service), f"the Serve config check let through: {corruption}"


def test_there_is_a_rayjob_per_pipeline():
    scripts = sorted(shlex.split(o["spec"]["entrypoint"])[1] for _, o in _jobs())
    assert scripts == ["pipelines/pretrain_finetune.py", "pipelines/train.py", "pipelines/tune.py"]


def _job_running(script: str) -> dict[str, Any]:
    return copy.deepcopy(next(o for _, o in _jobs() if shlex.split(o["spec"]["entrypoint"])[1] == script))


def _set_entrypoint(replace_from: str, replace_to: str):
    def corrupt(job):
        assert replace_from in job["spec"]["entrypoint"]
        job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(replace_from, replace_to)
    return corrupt


ENTRYPOINT_CORRUPTIONS = {
    "unknown flag": ("pipelines/train.py", _set_entrypoint("--gpu", "--gpus")),
    "missing script": ("pipelines/train.py", _set_entrypoint("pipelines/train.py", "pipelines/training.py")),
    "not python": ("pipelines/train.py", _set_entrypoint("python pipelines/train.py", "bash pipelines/train.py")),
    "workers != GPUs": ("pipelines/train.py", _set_entrypoint("--workers 4", "--workers 3")),
    "no --gpu": ("pipelines/pretrain_finetune.py", _set_entrypoint(" --gpu", "")),
    "bad int": ("pipelines/pretrain_finetune.py", _set_entrypoint("--workers 4", "--workers four")),
    "unknown config key": ("pipelines/train.py", _set_entrypoint("--register-as ssd-voc",
                                                                 "--register-as ssd-voc train.batchsize=32")),
    "unknown preset": ("pipelines/pretrain_finetune.py",
                       _set_entrypoint("--config ssd300_coco_to_voc", "--config ssd301")),
    "unknown stage config key": ("pipelines/pretrain_finetune.py",
                                 _set_entrypoint("--storage-path s3://ssd-runs/runs",
                                                 "--storage-path s3://ssd-runs/runs --finetune optim.lrr=0.1")),
    "missing space": ("pipelines/tune.py", _set_entrypoint("tune_spaces/priors_ssd300.yaml", "tune_spaces/nope.yaml")),
    "trial larger than the cluster": ("pipelines/tune.py",
                                      _set_entrypoint("--workers-per-trial 1", "--workers-per-trial 5")),
    "too many CPUs per worker": ("pipelines/tune.py", _set_entrypoint("--cpus-per-worker 6", "--cpus-per-worker 12")),
    "sweep storage off the shared volume": ("pipelines/tune.py",
                                            _set_entrypoint("--storage-path /mnt/shared/runs",
                                                            "--storage-path /tmp/runs")),
    "data off the shared volume": ("pipelines/pretrain_finetune.py",
                                   _set_entrypoint("--coco-data /mnt/shared/", "--coco-data /data/")),
    "no storage path": ("pipelines/train.py", _set_entrypoint("--storage-path s3://ssd-runs/runs", "")),
    "wrong working_dir": ("pipelines/train.py",
                          lambda job: job["spec"].update(runtimeEnvYAML="working_dir: /home/ray/elsewhere\n")),
}


@pytest.mark.parametrize("corruption", ENTRYPOINT_CORRUPTIONS)
def test_entrypoint_check_rejects_a_corrupted_job(corruption):
    script, corrupt = ENTRYPOINT_CORRUPTIONS[corruption]
    job = _job_running(script)
    workdir = dockerfile_workdir(RAY_DOCKERFILE.read_text())
    assert entrypoint_errors(job, workdir) == []
    corrupt(job)
    assert entrypoint_errors(job, workdir), f"the entrypoint check let through: {corruption}"


def test_no_plain_text_secret_in_committed_files():
    files = committed_files()
    assert ENV_EXAMPLE in files and COMPOSE in files and CLUSTER_DOC in files
    assert not any(p.name == ".env" for p in files)
    found = [f for p in files for f in secret_findings(p, p.read_text(errors="replace"))]
    assert found == []
    # env.example holds only placeholders for its secret-like variables
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, _, value = line.partition("=")
        if value and not key.startswith("#") and SECRET_NAME.search(key):
            assert value.startswith("CHANGE_ME"), line


@pytest.mark.parametrize("path,before,after", [
    (INFRA / "mlflow" / "k8s" / "mlflow.yaml",
     "- name: POSTGRES_PASSWORD\n              valueFrom: {secretKeyRef: {name: mlflow-postgres, key: POSTGRES_PASSWORD}}",
     "- name: POSTGRES_PASSWORD\n              value: hunter2hunter2"),
    (INFRA / "mlflow" / "k8s" / "mlflow.yaml", "$(POSTGRES_PASSWORD)@postgres", "hunter2@postgres"),
    (COMPOSE, "MINIO_ROOT_PASSWORD: ${MINIO_ROOT_PASSWORD:?", "MINIO_ROOT_PASSWORD: minio123 #"),
    (INFRA / "mlflow" / "k8s" / "secrets.example.sh", '--from-literal=POSTGRES_PASSWORD="$POSTGRES_PASSWORD"',
     "--from-literal=POSTGRES_PASSWORD=hunter2"),
    (ENV_EXAMPLE, "AWS_SECRET_ACCESS_KEY=CHANGE_ME_s3_secret_key", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI"),
    (INFRA / "k8s" / "shared.yaml", 'AWS_DEFAULT_REGION: "us-east-1"',
     'AWS_DEFAULT_REGION: "us-east-1"\n  AWS_SECRET_ACCESS_KEY: "abc123abc123"'),
    (INFRA / "k8s" / "raycluster.yaml", "  authOptions: {mode: token}\n",
     "  authOptions: {mode: token}\n  x-env: [{name: RAY_AUTH_TOKEN, value: 9f86d081884c7d65}]\n"),
    (INFRA / "k8s" / "shared.yaml", 'RAY_USAGE_STATS_ENABLED: "0"',
     'RAY_USAGE_STATS_ENABLED: "0"\n  RAY_AUTH_TOKEN: "9f86d081884c7d65"'),
    (CLUSTER_DOC, 'export RAY_AUTH_TOKEN="$(kubectl', 'export RAY_AUTH_TOKEN=9f86d081884c7d65 X="$(kubectl'),
], ids=["env value", "url password", "compose literal", "from-literal", "env.example value", "configmap key",
        "ray token env", "ray token configmap", "ray token in the guide"])
def test_secret_scan_finds_a_planted_secret(path, before, after):
    text = path.read_text()
    assert before in text
    assert secret_findings(path, text) == []
    assert secret_findings(path, text.replace(before, after, 1))


def test_secret_scan_finds_a_committed_secret_object():
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {user: admin}\n"
    assert secret_findings(Path("x.yaml"), secret)


def test_mlflow_env_file_is_git_ignored():
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "infra/mlflow/.env"], check=False)
    assert result.returncode == 0, "infra/mlflow/.env (real credentials) must be git-ignored"
    result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "infra/mlflow/env.example"], check=False)
    assert result.returncode == 1, "env.example must be committed"


# --------------------------------------------------------------------------------------------
# docs/cluster.md: its commands name real files and flags


def doc_commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.DOTALL):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def doc_errors(text: str) -> list[str]:
    """Pipeline commands whose script refuses their flags; repo paths that do not exist."""
    errors = []
    for command in doc_commands(text):
        words = shlex.split(command)
        created = {words[-1]} if words[0] in ("cp", "mv") else set()  # a copy's target is made by it
        for path in re.findall(r"(?<![\w/.-])((?:infra|pipelines|tune_spaces|docs|tests)/[\w./-]*\w)", command):
            if path not in created and not (ROOT / path).exists():
                errors.append(f"{command!r}: no {path} in the repository")
        match = re.search(r"\b(python3? pipelines/\S+\.py.*)$", command)
        if match:
            entry = re.split(r"\s(?:&&|\||;|>)\s", match.group(1))[0]
            try:
                parse_entrypoint(entry)
            except BadEntrypoint as err:
                errors.append(f"{command!r}: {err}")
    return errors


def test_cluster_doc_commands_are_real():
    text = CLUSTER_DOC.read_text()
    commands = doc_commands(text)
    assert sum("pipelines/" in c for c in commands) >= 6
    assert any("pipelines/pretrain_finetune.py" in c for c in commands)
    assert any("pipelines/tune.py" in c for c in commands)
    assert doc_errors(text) == []
    helm = [c for c in commands if c.startswith("helm install")]
    assert helm and all(re.search(r"--version \d+\.\d+\.\d+", c) for c in helm), "pin the KubeRay chart version"
    assert pinned_version("ray") in text


def test_cluster_doc_check_finds_a_bad_command():
    bad = "```bash\npython pipelines/tune.py --space tune_spaces/default.yaml --wrokers-per-trial 2\n" \
          "kubectl apply -f infra/k8s/nope.yaml\n```\n"
    errors = doc_errors(bad)
    assert len(errors) == 2, errors


# --------------------------------------------------------------------------------------------
# Ray token authentication


def _ray_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{_rel(p)}:{o['metadata']['name']}", o) for p, o in all_objects()
            if o["kind"] in ("RayCluster", "RayJob", "RayService")]


@pytest.mark.parametrize("where,obj", _ray_objects(), ids=[w for w, _ in _ray_objects()])
def test_every_ray_cluster_runs_with_token_auth(where, obj):
    assert ray_auth_errors(obj, _configmap_data()) == []


def test_every_ray_pod_uses_the_shared_configmap_without_auth_settings():
    """The ConfigMap every Ray container loads must not carry RAY_AUTH_* (it would lose to
    KubeRay's env only by accident of precedence), and every Ray cluster is covered."""
    configmaps = _configmap_data()
    assert "ssd-ray-env" in configmaps and not set(configmaps["ssd-ray-env"]) & RAY_AUTH_ENV
    kinds = [o["kind"] for _, o in _ray_objects()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 3 and kinds.count("RayService") == 1


def _add_env(group: str, name: str, **value):
    def corrupt(obj, configmaps):
        spec = cluster_specs(obj)[0]
        template = spec["headGroupSpec"]["template"] if group == "head" else spec["workerGroupSpecs"][0]["template"]
        template["spec"]["containers"][0].setdefault("env", []).append({"name": name, **value})
    return corrupt


AUTH_CORRUPTIONS = {
    "no authOptions": lambda o, c: cluster_specs(o)[0].pop("authOptions"),
    "mode disabled": lambda o, c: cluster_specs(o)[0].update(authOptions={"mode": "disabled"}),
    "empty authOptions": lambda o, c: cluster_specs(o)[0].update(authOptions={}),
    "Ray too old for token auth": lambda o, c: cluster_specs(o)[0].update(rayVersion="2.51.1"),
    "worker RAY_AUTH_MODE disabled": _add_env("worker", "RAY_AUTH_MODE", value="disabled"),
    "head token as a literal": _add_env("head", "RAY_AUTH_TOKEN", value="0123456789abcdef"),
    "head token from another Secret": _add_env(
        "head", "RAY_AUTH_TOKEN", valueFrom={"secretKeyRef": {"name": "other", "key": "token"}}),
    "worker token file": _add_env("worker", "RAY_AUTH_TOKEN_PATH", value="/etc/ray/token"),
    "ConfigMap turns it off": lambda o, c: c["ssd-ray-env"].update(RAY_AUTH_MODE="disabled"),
    "init container sets the mode": lambda o, c: cluster_specs(o)[0]["workerGroupSpecs"][0]["template"]["spec"]
    .setdefault("initContainers", []).append({"name": "x", "image": "x", "env": [{"name": "RAY_AUTH_MODE", "value": "token"}]}),
}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
@pytest.mark.parametrize("corruption", AUTH_CORRUPTIONS)
def test_token_auth_check_rejects_a_corrupted_cluster(kind, corruption):
    obj, configmaps = _first_of(kind), copy.deepcopy(_configmap_data())
    assert ray_auth_errors(obj, configmaps) == []
    AUTH_CORRUPTIONS[corruption](obj, configmaps)
    assert ray_auth_errors(obj, configmaps), f"the auth check let through: {corruption}"


def test_token_auth_check_covers_the_submitter_template():
    job = _first_of("RayJob")
    job["spec"]["submitterPodTemplate"] = {"spec": {"restartPolicy": "Never", "containers": [
        {"name": "ray-job-submitter", "image": "x", "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}]}}
    assert ray_auth_errors(job, _configmap_data())


def test_no_file_turns_token_auth_off():
    files = [*K8S_FILES, CLUSTER_DOC, *(INFRA / "docker").glob("*"), *(INFRA / "k8s").glob("*")]
    found = [f for p in sorted(set(files)) for f in auth_disabled_findings(p, p.read_text())]
    assert found == []


@pytest.mark.parametrize("path,before,after", [
    (INFRA / "k8s" / "shared.yaml", '  RAY_USAGE_STATS_ENABLED: "0"\n',
     '  RAY_USAGE_STATS_ENABLED: "0"\n  RAY_AUTH_MODE: "disabled"\n'),
    (INFRA / "k8s" / "raycluster.yaml", "  authOptions: {mode: token}\n", "  authOptions: {mode: disabled}\n"),
    (INFRA / "k8s" / "rayjob-train.yaml", "                env:\n                  - name: AWS_ACCESS_KEY_ID\n",
     ('                env:\n                  - {name: RAY_AUTH_MODE, value: "off"}\n'
      '                  - name: AWS_ACCESS_KEY_ID\n')),
    (CLUSTER_DOC, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
], ids=["configmap", "authOptions", "env", "doc"])
def test_auth_off_scan_finds_a_planted_switch(path, before, after):
    text = path.read_text()
    assert before in text
    assert auth_disabled_findings(path, text) == []
    assert auth_disabled_findings(path, text.replace(before, after, 1))


def test_token_secret_of_the_cluster_is_the_one_the_guide_creates():
    cluster = _raycluster()
    secret = kuberay_auth_secret(cluster["metadata"]["name"])
    assert secret == "ssd-ray"
    assert doc_auth_errors(CLUSTER_DOC.read_text(), secret) == []
    # and the RayCluster manifest's own instructions agree with it
    header = (INFRA / "k8s" / "raycluster.yaml").read_text()
    assert f"create secret generic {secret} --from-literal={AUTH_TOKEN_KEY}=" in header
    assert f"get secret {secret} -o jsonpath='{{.data.{AUTH_TOKEN_KEY}}}'" in header


def test_kuberay_secret_name_follows_checkname():
    assert kuberay_auth_secret("ssd-ray") == "ssd-ray"
    assert kuberay_auth_secret("1cluster") == "rcluster"
    assert kuberay_auth_secret("x" * 60) == "x" * 50


def _doc_edit(before: str, after: str):
    def corrupt(text):
        assert before in text, before
        return text.replace(before, after)
    return corrupt


DOC_AUTH_CORRUPTIONS = {
    "Secret of another name": _doc_edit("create secret generic ssd-ray ", "create secret generic ssd-ray-auth "),
    "another key": _doc_edit("--from-literal=auth_token=", "--from-literal=token="),
    "literal token": _doc_edit('--from-literal=auth_token="$(openssl rand -hex 32)"', "--from-literal=auth_token=s3cr3t"),
    "no RAY_AUTH_MODE export": _doc_edit("export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token",
                                         "export RAY_ADDRESS=http://127.0.0.1:8265"),
    "token read from another Secret": _doc_edit("get secret ssd-ray -o", "get secret ssd-ray-auth -o"),
    "no refused request": _doc_edit("curl -s -o /dev/null -w '%{http_code}\\n' http://127.0.0.1:8265/api/jobs/",
                                    "true"),
    "KubeRay without authOptions": _doc_edit("--version 1.5.1", "--version 1.5.0"),
    "auth off": _doc_edit("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
}


@pytest.mark.parametrize("corruption", DOC_AUTH_CORRUPTIONS)
def test_doc_auth_check_rejects_a_corrupted_guide(corruption):
    text = CLUSTER_DOC.read_text()
    assert doc_auth_errors(text, "ssd-ray") == []
    assert doc_auth_errors(DOC_AUTH_CORRUPTIONS[corruption](text), "ssd-ray"), corruption


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
