"""Static checks of infra/: nothing here is built or started (no Docker, no network).

Every YAML parses; every image is pinned; no secret is a literal; the environment variables
vlmflow's code reads to find its servers are set where vlmflow runs; the Dockerfiles pin what
pyproject.toml pins and install torch first and alone.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)$")
PINS = {m[1].lower().replace("_", "-"): m[2] for m in map(PIN.match, PYPROJECT["project"]["dependencies"]) if m}
VERSION = PYPROJECT["project"]["version"]

SECRET_NAME = re.compile(r"password|passwd|secret|token|api_?key|access_?key|private_?key|auth_string|credential", re.I)
STRUCTURAL_KEYS = {"secretKeyRef", "secretRef", "secretName"}
REQUIRED_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")  # compose: fail loudly when unset
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}")
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^\s:/@'\"]+:([^\s@'\"]+)@")
ENV_READ = re.compile(
    r"""os\.(?:environ\.get|getenv)\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""
    r"""|["']([A-Z][A-Z0-9_]*)["']\s+(?:not\s+)?in\s+os\.environ"""
)


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict:
    return load(INFRA / "compose.yaml")[0]


def walk(node: object, key: object = None):
    """Every (key, value) pair of nested mappings; a list's items come with the list's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield key, item
            yield from walk(item, key)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def dockerfiles() -> list[Path]:
    return sorted(INFRA.rglob("Dockerfile"))


def is_pinned(ref: str) -> bool:
    if "${" in ref:
        return False
    if "@" in ref:
        return re.search(r"@sha256:[0-9a-f]{64}$", ref) is not None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return bool(tag) and "latest" not in tag and tag not in {"stable", "nightly", "main", "master", "edge"}


def secret_ref(entry: dict) -> bool:
    return "value" not in entry and "secretKeyRef" in (entry.get("valueFrom") or {})


def secret_literals(path: Path, docs: list) -> list[str]:
    """Secret-looking fields whose value is written out instead of referenced."""
    bad = []
    for doc in docs:
        for key, value in walk(doc):
            if key == "environment" and isinstance(value, str) and "=" in value:  # compose list form KEY=VALUE
                key, value = value.split("=", 1)
            literal = not isinstance(value, dict | list) and not REQUIRED_REF.fullmatch(str(value))
            if isinstance(key, str) and key not in STRUCTURAL_KEYS and SECRET_NAME.search(key) and literal:
                bad.append(f"{path}: {key}")
            env_entry = isinstance(value, dict) and bool({"value", "valueFrom"} & value.keys())
            if env_entry and SECRET_NAME.search(str(value.get("name", ""))) and not secret_ref(value):
                bad.append(f"{path}: env {value['name']}")  # a k8s env entry must use valueFrom.secretKeyRef
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            bad.append(f"{path}: Secret {doc['metadata']['name']} has inline values")
    return bad


def test_expected_files_exist_and_every_yaml_parses():
    names = {p.relative_to(INFRA).as_posix() for p in yaml_files()}
    expected = {"compose.yaml", "ray/cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml"}
    assert expected | {"k8s/prefect-worker.yaml", "k8s/mlflow.yaml", "k8s/kustomization.yaml"} <= names
    for path in yaml_files():
        docs = load(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"
    assert {"Dockerfile", "mlflow/Dockerfile"} <= {p.relative_to(INFRA).as_posix() for p in dockerfiles()}


def test_kubernetes_manifests_name_the_needed_objects():
    objects = {(d["kind"], d.get("metadata", {}).get("name")) for p in (INFRA / "k8s").glob("*.yaml") for d in load(p)}
    kinds = {kind for kind, _ in objects}
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= kinds
    assert {("Deployment", "mlflow"), ("Service", "mlflow"), ("Deployment", "prefect-worker")} <= objects
    kustomization = load(INFRA / "k8s" / "kustomization.yaml")[0]
    assert all((INFRA / "k8s" / name).is_file() for name in kustomization["resources"])
    job = load(INFRA / "k8s" / "rayjob.yaml")[0]
    assert job["spec"]["entrypoint"].startswith("vlmflow run /app/specs/")
    spec_path = job["spec"]["entrypoint"].split()[2].removeprefix("/app/")
    assert (ROOT / spec_path).is_file(), f"the RayJob runs {spec_path}, which the image would not hold"
    assert (
        job["spec"]["clusterSelector"]["ray.io/cluster"]
        == load(INFRA / "k8s" / "raycluster.yaml")[0]["metadata"]["name"]
    )


def test_the_pin_checker_rejects_floating_references():
    assert not is_pinned("postgres")
    assert not is_pinned("postgres:latest")
    assert not is_pinned("rayproject/ray:latest-cpu")
    assert not is_pinned("registry:5000/vlmflow")
    assert is_pinned("registry:5000/vlmflow:0.1.0")
    assert is_pinned("python@sha256:" + "a" * 64)


def test_every_image_is_pinned():
    images = [(p, v) for p in yaml_files() for d in load(p) for k, v in walk(d) if k in {"image", "worker_image"}]
    images += [(p, args.split()[0]) for p in dockerfiles() for op, args in dockerfile(p) if op == "FROM"]
    assert len(images) >= 12, images
    assert [(str(p), ref) for p, ref in images if not isinstance(ref, str) or not is_pinned(ref)] == []
    assert all("image" in service for service in compose()["services"].values()), "a service would build untagged"


def test_image_versions_follow_pyproject():
    services = compose()["services"]
    assert services["vlmflow"]["image"] == f"vlmflow:{VERSION}"
    assert services["mlflow"]["image"] == f"vlmflow-mlflow:{PINS['mlflow']}"
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{PINS['prefect']}-python3.11"
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert services[name]["image"] == services["vlmflow"]["image"], f"{name}: Ray and Python must match"
    cluster = load(INFRA / "k8s" / "raycluster.yaml")[0]
    assert cluster["spec"]["rayVersion"] == PINS["ray"]
    assert load(INFRA / "ray" / "cluster.yaml")[0]["docker"]["image"] == f"vlmflow:{VERSION}"


def test_the_secret_checker_finds_literals():
    fake = [
        {"environment": {"POSTGRES_PASSWORD": "hunter2", "MINIO_ROOT_USER": "${MINIO_ROOT_USER:?set it}"}},
        {"env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "x"}]},
        {"environment": ["PREFECT_API_AUTH_STRING=${PREFECT_API_AUTH_STRING:-admin:admin}"]},
        {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}},
    ]
    assert len(secret_literals(Path("fake.yaml"), fake)) == 4


def test_no_secret_is_a_literal():
    bad = [item for p in yaml_files() for item in secret_literals(p, load(p))]
    for path in dockerfiles():
        steps = dockerfile(path)
        bad += [f"{path}: {op} {args}" for op, args in steps if op in {"ENV", "ARG"} and SECRET_NAME.search(args)]
    for path in (p for p in INFRA.rglob("*") if p.is_file()):
        for password in URL_CREDENTIALS.findall(path.read_text()):
            if not password.startswith("$"):
                bad.append(f"{path}: a URL with an inline password")
    assert bad == []


def test_env_example_lists_every_compose_secret_with_empty_values():
    example = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            example[name] = value
    assert example and all(value == "" for value in example.values()), "commit names only, never values"
    refs = INTERPOLATION.findall((INFRA / "compose.yaml").read_text())
    assert {name for name, _, _ in refs} >= set(example)
    for name, op, _ in refs:
        if name in example or SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} must fail loudly when unset: ${{{name}:?message}}"
            assert name in example, f"{name} is missing from infra/.env.example"
        else:
            assert op == ":-", f"${{{name}}} needs a default (:-) or must be a required secret (:?)"


def test_dotenv_is_ignored_by_git():
    patterns = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert patterns & {"infra/.env", ".env", "**/.env"}, "add infra/.env to .gitignore"
    assert not patterns & {"*.example", ".env*", "infra/.env*"}, "infra/.env.example must stay committed"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**/.env" in ignore, "the build context must not carry infra/.env"


def code_reads() -> set[str]:
    names = set()
    for folder in ("src", "components", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= {next(g for g in m.groups() if g) for m in ENV_READ.finditer(path.read_text())}
    return names


def library_source(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    return (Path(spec.submodule_search_locations[0]) / relative).read_text()


def test_compose_sets_the_server_variables_vlmflow_reads():
    server_vars = {name for name in code_reads() if name.endswith(("_URL", "_URI", "_ADDRESS"))}
    assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"} <= server_vars
    services = compose()["services"]
    for name in ("vlmflow", "prefect-worker"):
        assert server_vars <= set(environment(services[name])), f"{name} lacks {server_vars}"
    env = environment(services["vlmflow"])
    client_port = re.search(r"--ray-client-server-port=(\d+)", " ".join(services["ray-head"]["command"]))[1]
    assert env["RAY_ADDRESS"] == f"ray://ray-head:{client_port}"
    mlflow = urlparse(env["MLFLOW_TRACKING_URI"])
    assert mlflow.hostname in services and f"--port={mlflow.port}" in services["mlflow"]["command"]
    prefect = urlparse(env["PREFECT_API_URL"])
    assert prefect.hostname in services and prefect.path == "/api"
    assert str(prefect.port) in services["prefect-server"]["command"]


def test_compose_clients_carry_the_credentials_the_servers_require():
    assert '"MLFLOW_TRACKING_USERNAME"' in library_source("mlflow", "environment_variables.py")
    assert '"MLFLOW_TRACKING_PASSWORD"' in library_source("mlflow", "environment_variables.py")
    assert "auth_string" in library_source("prefect", "settings/models/api.py")  # PREFECT_API_AUTH_STRING
    services = compose()["services"]
    assert "--app-name=basic-auth" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]
    server, client = environment(services["mlflow"]), environment(services["vlmflow"])
    assert server["MLFLOW_AUTH_ADMIN_USERNAME"] == client["MLFLOW_TRACKING_USERNAME"]
    assert server["MLFLOW_AUTH_ADMIN_PASSWORD"] == client["MLFLOW_TRACKING_PASSWORD"]
    prefect_server = environment(services["prefect-server"])
    assert prefect_server["PREFECT_SERVER_API_AUTH_STRING"] == client["PREFECT_API_AUTH_STRING"]


def pod_env(container: dict, configmaps: dict[str, dict]) -> set[str]:
    names = {entry["name"] for entry in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(configmaps[source["configMapRef"]["name"]]["data"]) if "configMapRef" in source else set()
    return names


def test_kubernetes_drivers_get_the_server_variables():
    docs = [d for p in (INFRA / "k8s").glob("*.yaml") for d in load(p)]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    needed = {name for name in code_reads() if name.endswith(("_URL", "_URI", "_ADDRESS"))}
    needed |= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"}
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker")
    assert needed <= pod_env(worker["spec"]["template"]["spec"]["containers"][0], configmaps)
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert needed - {"RAY_ADDRESS"} <= pod_env(head, configmaps)  # Ray sets RAY_ADDRESS for job drivers


def test_ray_cluster_launcher_config_matches_rays_schema():
    schema = json.loads(library_source("ray", "autoscaler/ray-schema.json"))
    config = load(INFRA / "ray" / "cluster.yaml")[0]
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "local"
    assert any("--ray-client-server-port=10001" in command for command in config["head_start_ray_commands"])


def test_dockerfile_installs_torch_first_and_alone_then_the_pinned_project():
    steps = dockerfile(INFRA / "Dockerfile")
    base = steps[0][1]
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    runs = [args for op, args in steps if op == "RUN"]
    installs = [i for i, args in enumerate(runs) if "pip install" in args]
    torch_run = next(i for i in installs if "torch==" in runs[i])
    project_run = next(i for i in installs if re.search(r"pip install (?:\S+ )*\.(?:\s|$)", runs[i]))
    assert torch_run < project_run, "torch must be installed before the project"
    torch_pins = re.findall(r"(\S+)==(\S+)", runs[torch_run])
    assert torch_pins == [("torch", PINS["torch"])], "torch is installed alone, at the pyproject pin"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs[torch_run]
    assert ("ARG", "TORCH_VARIANT=cpu") in steps
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert users and steps[users[-1]][1].strip() not in {"root", "0"}
    assert users[-1] > max(i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args)
    copies = [args.split()[:-1] for op, args in steps if op == "COPY"]
    assert all(src not in {".", "./", "infra", "infra/"} and ".env" not in src for srcs in copies for src in srcs)


@pytest.mark.parametrize("path", ["Dockerfile", "mlflow/Dockerfile"])
def test_dockerfile_pins_match_pyproject(path):
    runs = " ".join(args for op, args in dockerfile(INFRA / path) if op == "RUN")
    pins = {
        name.strip("\"'").split("[")[0].lower(): version.strip("\"'")
        for name, version in re.findall(r"([\"']?[A-Za-z0-9_.\-\[\]]+)==([^\s\"']+)", runs)
    }
    shared = {name for name in pins if name in PINS}
    assert shared, f"{path} names none of pyproject's packages"
    assert {name: pins[name] for name in shared} == {name: PINS[name] for name in shared}
