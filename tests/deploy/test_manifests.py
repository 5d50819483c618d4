"""deploy/ checked without a cluster: every file parses, versions and image tags follow pyproject.toml,
every jobs/ entry point and config a manifest names exists and validates, token auth is on, no
credential is written down, the upload leaves data and checkpoints behind, and the manifests pass
the schemas that can be had offline (Kubernetes' own via kubernetes-validate, the launcher's via
Ray's ray-schema.json). KubeRay's CRD schema ships with no Python package: the Ray-specific fields
are checked here by hand and the pod templates inside them against Kubernetes' PodTemplateSpec.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37"
WORKFLOWS = ("poison", "train", "defend", "sweep", "report")


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {"bdray": project["version"]}
    for dep in project["dependencies"]:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name)] = version
    return pins


PINS = _pins()
IMAGE_TAG = f"bdray:{PINS['bdray']}-ray{PINS['ray']}"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(DEPLOY.rglob("*.yaml")) if "launcher" not in p.parts for d in _docs(p)]


def _kind(kind: str) -> list[dict[str, Any]]:
    found = [d for _, d in _all_docs() if d["kind"] == kind]
    assert found, f"no {kind} in deploy/"
    return found


def _ray_cluster_specs() -> list[dict[str, Any]]:
    return [d["spec"] for d in _kind("RayCluster")] + [d["spec"]["rayClusterSpec"] for d in _kind("RayJob")]


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container spec anywhere in a document."""
    out = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                out.extend(node["containers"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return out


def _launcher() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "launcher" / "aws-gpu.yaml").read_text())


# -- parsing and versions ----------------------------------------------------------------------------


def test_every_manifest_parses_and_names_a_namespace() -> None:
    docs = _all_docs()
    assert {d["kind"] for _, d in docs} >= {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy",
                                            "PersistentVolumeClaim", "Namespace"}
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "bdray", (path, doc["kind"])


def test_ray_version_and_image_follow_the_package() -> None:
    for spec in _ray_cluster_specs():
        assert spec["rayVersion"] == PINS["ray"]
        for template in _pod_templates(spec):
            for container in template["spec"]["containers"]:
                assert container["image"].endswith("/" + IMAGE_TAG), container["image"]
    for doc in _kind("RayJob"):
        for container in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            assert container["image"].endswith("/" + IMAGE_TAG)  # the submitter needs the working dir
    assert _launcher()["docker"]["image"].endswith("/" + IMAGE_TAG)

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == PINS["ray"]
    base = re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py(\d)(\d+)", dockerfile, re.M)
    assert base, "the image must start from Ray's image at RAY_VERSION"
    python = (int(base.group(1)), int(base.group(2)))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low, high = (tuple(int(x) for x in v.split(".")) for v in re.findall(r"[\d.]+", requires))
    assert low <= python < high
    assert IMAGE_TAG in dockerfile  # the build command in its header


def test_the_mlflow_server_runs_the_pinned_mlflow() -> None:
    dockerfile = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"^ARG MLFLOW_VERSION=(\S+)$", dockerfile, re.M).group(1) == PINS["mlflow"]
    assert f'"pyarrow=={PINS["pyarrow"]}"' in dockerfile
    (deployment,) = _kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f"/bdray-mlflow:{PINS['mlflow']}")


# -- entry points --------------------------------------------------------------------------------------


def test_every_workflow_has_an_entry_point() -> None:
    for name in WORKFLOWS:
        assert (ROOT / "jobs" / f"{name}.py").is_file(), name


def _named_files(text: str) -> set[str]:
    return set(re.findall(r"\b((?:jobs|configs)/[\w./-]+\.(?:py|yaml))\b", text))


def test_every_entry_point_and_config_the_deploy_files_name_exists() -> None:
    named: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named |= _named_files(path.read_text())
    assert any(n.startswith("jobs/") for n in named)
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"deploy/ names files that do not exist: {missing}"


def _check_entrypoint(entrypoint: str) -> None:
    """The job a manifest runs gets past config validation (no dataset or cluster needed for that)."""
    from bdray import workflows

    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("jobs/"), entrypoint
    script = Path(argv[1]).stem
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    loader = {"poison": workflows.load_experiment, "train": workflows.load_experiment,
              "defend": workflows.load_defended, "sweep": workflows.load_sweep_config,
              "report": workflows.load_sweep_config}[script]
    loader(ROOT / config, overrides)


def test_the_rayjob_runs_an_entry_point_with_a_valid_config() -> None:
    for doc in _kind("RayJob"):
        spec = doc["spec"]
        _check_entrypoint(spec["entrypoint"])
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/home/ray/bdray"  # where the Dockerfile puts the repository
        assert spec["shutdownAfterJobFinishes"] is True
    assert "WORKDIR /home/ray/bdray" in (DEPLOY / "Dockerfile").read_text()


# -- security ------------------------------------------------------------------------------------------


def test_token_auth_is_on_everywhere() -> None:
    for spec in _ray_cluster_specs():
        assert spec["authOptions"]["mode"] == "token"
        assert spec["authOptions"]["secretName"]
    for doc in _kind("RayJob"):
        (submitter,) = doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
        env = {e["name"]: e for e in submitter["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
            doc["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    launcher = _launcher()
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the user's, not a file here
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the job API is reached through `ray dashboard`'s tunnel


def test_mlflow_is_private_and_takes_its_database_from_a_secret() -> None:
    (service,) = _kind("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not any(d["kind"] == "Ingress" for _, d in _all_docs())
    policies = {d["metadata"]["name"]: d for d in _kind("NetworkPolicy")}
    assert any(p["spec"]["podSelector"] == {"matchLabels": service["spec"]["selector"]} for p in policies.values())
    (deployment,) = _kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)
    env = {e["name"]: e for e in container["env"]}
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert "--serve-artifacts" in container["args"]
    assert env[args["--artifacts-destination"][2:-1]]["value"].startswith("s3://")
    allowed = args["--allowed-hosts"].split(",")
    assert "*" not in allowed and "mlflow.bdray.svc.cluster.local:5000" in allowed
    tracking = {e["value"] for t in (tp for s in _ray_cluster_specs() for tp in _pod_templates(s))
                for c in t["spec"]["containers"] for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI"}
    assert tracking == {"http://mlflow.bdray.svc.cluster.local:5000"}  # a Host the server accepts


CREDENTIAL_NAME = re.compile(r"(TOKEN|PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL)", re.I)
CREDENTIAL_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[a-z][a-z0-9+]*://[^\s:/@$]+:[^\s@$]+@"),  # user:password@ in a URI, unless a $variable
    re.compile(r"(?i)\b(password|passwd|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{8,}"),
]


def test_no_credentials_are_written_down() -> None:
    for path, doc in _all_docs():
        assert doc["kind"] != "Secret", f"{path}: Secrets are created from the environment, not applied from files"
        for container in _containers(doc):
            for env in container.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]) and env["name"] != "RAY_AUTH_MODE":
                    assert "valueFrom" in env and "value" not in env, f"{path}: {env['name']} has a literal value"
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + list((ROOT / "jobs").glob("*.py"))
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_TEXT:
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(ROOT)}: looks like a credential: {match.group(0)!r}"


def test_the_credential_check_would_catch_one() -> None:
    leaks = ["postgresql://mlflow:hunter2@db:5432/mlflow", "password: correcthorsebattery", "AKIAABCDEFGHIJKLMNOP"]
    for leak in leaks:
        assert any(p.search(leak) for p in CREDENTIAL_TEXT), leak
    fine = ["postgresql://mlflow:${MLFLOW_DB_PASSWORD}@${MLFLOW_DB_HOST}:5432/mlflow", "auth_token: $(openssl rand)"]
    for text in fine:
        assert not any(p.search(text) for p in CREDENTIAL_TEXT), text


# -- what `ray job submit --working-dir .` uploads ------------------------------------------------------


def test_the_upload_holds_code_and_configs_only(tmp_path: Path) -> None:
    import zipfile

    from ray._private.runtime_env.packaging import create_package  # what `ray job submit` zips

    target = tmp_path / "pkg.zip"
    create_package(str(ROOT), target, include_gitignore=True)
    names = zipfile.ZipFile(target).namelist()
    top = {n.split("/")[0] for n in names}
    assert {"bdray", "jobs", "configs"} <= top
    assert not top & {".git", ".venv", ".bdray", "runs", "data", "checkpoints", "mlruns", "tests", "bench"}
    assert not [n for n in names if n.endswith((".safetensors", ".pt", ".pth", ".ckpt", ".npz", ".db"))]
    assert "bdray/data/__init__.py" in names  # anchored patterns: the package's own data/ stays
    assert target.stat().st_size < 2 * 2**20


# -- schemas -------------------------------------------------------------------------------------------


def test_kubernetes_objects_pass_the_kubernetes_schema() -> None:
    import kubernetes_validate as kv  # a dev dependency: the schemas ship with it, nothing is downloaded
    checked = 0
    for path, doc in _all_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {exc}")
        checked += 1
    assert checked >= 6


def _pod_template_validator():
    from importlib.resources import files

    import jsonschema
    import referencing

    base = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    definitions = json.loads((base / "_definitions.json").read_text())
    registry = referencing.Registry().with_resource(definitions["$id"],
                                                    referencing.Resource.from_contents(definitions))
    schema = json.loads((base / "podtemplatespec-v1.json").read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


RAY_CLUSTER_FIELDS = {"rayVersion", "enableInTreeAutoscaling", "authOptions", "headGroupSpec", "workerGroupSpecs",
                      "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"}
RAY_JOB_FIELDS = {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                  "activeDeadlineSeconds", "backoffLimit", "submitterPodTemplate", "rayClusterSpec", "submissionMode",
                  "clusterSelector", "metadata", "jobId", "suspend", "entrypointNumCpus", "entrypointNumGpus",
                  "entrypointResources", "submitterConfig", "deletionStrategy", "managedBy"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                       "numOfHosts", "scaleStrategy", "suspend", "idleTimeoutSeconds"}


def test_ray_resources_have_known_fields_and_valid_pod_templates() -> None:
    validator = _pod_template_validator()
    for doc in _kind("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1"
        assert set(doc["spec"]) <= RAY_JOB_FIELDS, set(doc["spec"]) - RAY_JOB_FIELDS
        errors = [e.message for e in validator.iter_errors(doc["spec"]["submitterPodTemplate"])]
        assert not errors, errors
    for doc in _kind("RayCluster"):
        assert doc["apiVersion"] == "ray.io/v1"
    for spec in _ray_cluster_specs():
        assert set(spec) <= RAY_CLUSTER_FIELDS, set(spec) - RAY_CLUSTER_FIELDS
        assert set(spec["headGroupSpec"]) <= {"rayStartParams", "template", "serviceType", "headService",
                                              "enableIngress", "headHostname"}
        assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())
        groups = spec["workerGroupSpecs"]
        assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
                   for c in g["template"]["spec"]["containers"]), "no GPU worker group"
        for group in groups:
            assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for template in _pod_templates(spec):
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(template)]
            assert not errors, errors


def test_the_launcher_config_passes_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = _launcher()
    jsonschema.validate(launcher, schema)
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("gpu" in name for name in launcher["available_node_types"])
