"""Static checks of infra/: nothing here is built or started (no Docker, no network).

Every YAML parses; every image is pinned; no secret is a literal; the environment variables
vlmflow's code reads to find its servers are set where vlmflow runs; the Dockerfiles pin what
pyproject.toml pins and install torch first and alone. Against hostile neighbours: every Ray
node and client runs with the pinned Ray's token authentication and one token from infra/.env
or one Secret; the Kubernetes NetworkPolicies deny ingress by default and admit only pods with
the vlmflow label, which every pod calling Ray, MLflow or Prefect carries; MLflow uses its own
bucket-scoped MinIO user, never the root credentials.
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


# --- hostile deployments: Ray token auth, NetworkPolicies, MLflow's own object-store user ---

PART_OF = {"app.kubernetes.io/part-of": "vlmflow"}  # the label the NetworkPolicies admit
RAY_TOKEN_SECRET = {"name": "ray-auth", "key": "auth_token"}  # KubeRay requires the key auth_token
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard / job API, Ray Client
CLIENT_VARS = {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"}  # a pod with one calls a server
ROOT_CREDENTIALS = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


def k8s_docs() -> list[dict]:
    return [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in load(p) if "kind" in d]


def k8s_configmaps() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "ConfigMap"}


def pod_templates(doc: dict) -> list[tuple[str, str, dict]]:
    """(where, role, pod template) of a workload; role is ray-node, ray-submitter or pod."""
    metadata = doc.get("metadata") or {}
    kind, name = doc["kind"], metadata.get("name") or metadata.get("generateName")
    spec = doc.get("spec") or {}
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [(f"{kind}/{name}", "pod", spec["template"])]
    if kind == "CronJob":
        return [(f"{kind}/{name}", "pod", spec["jobTemplate"]["spec"]["template"])]
    if kind == "Pod":
        return [(f"{kind}/{name}", "pod", doc)]
    if kind == "RayCluster":
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        return [(f"{kind}/{name}/{group}", "ray-node", g["template"]) for group, g in groups]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        return [(f"{kind}/{name}/submitter", "ray-submitter", spec["submitterPodTemplate"])]
    return []


def template_labels(template: dict) -> dict[str, str]:
    return (template.get("metadata") or {}).get("labels") or {}


def env_entry(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def secret_key_ref(entry: dict | None) -> dict | None:
    return ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")


def has_k8s_ray_token_auth(container: dict) -> bool:
    mode, token = env_entry(container, "RAY_AUTH_MODE"), env_entry(container, "RAY_AUTH_TOKEN")
    from_secret = secret_ref(token or {}) and secret_key_ref(token) == RAY_TOKEN_SECRET
    return (mode or {}).get("value") == "token" and bool(from_secret)


def test_pinned_ray_supports_token_auth_from_the_environment():
    """The mechanism used below is the pinned Ray's own: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN."""
    setup = library_source("ray", "_private/authentication/authentication_token_setup.py")
    assert 'AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"' in setup
    assert 'return auth_mode_env.lower() == "token"' in setup
    assert "create_token_if_missing=False" in library_source("ray", "scripts/scripts.py")  # ray start never invents one
    assert '"RAY_AUTH_TOKEN" not in env_vars' in library_source("ray", "_private/runtime_env/image_uri.py")
    dashboard = library_source("ray", "dashboard/http_server_head.py")
    public = dashboard[dashboard.index("public_exact_paths = {") :].split("}", 1)[0]  # served without a token
    healthcheck = " ".join(compose()["services"]["ray-head"]["healthcheck"]["test"])
    path = re.search(r"127\.0\.0\.1:\d+(/[\w/]+)", healthcheck)[1]
    assert f'"{path}"' in public, f"the ray-head healthcheck ({path}) would need the token"
    assert tuple(map(int, PINS["ray"].split(".")[:2])) >= (2, 52)  # token auth arrived in Ray 2.52


def compose_ray_token_ok(env: dict[str, str]) -> bool:
    token = env.get("RAY_AUTH_TOKEN", "")
    return env.get("RAY_AUTH_MODE") == "token" and bool(REQUIRED_REF.fullmatch(token)) and "${RAY_AUTH_TOKEN:?" in token


def test_compose_ray_nodes_and_clients_use_the_token_from_the_env_file():
    services = compose()["services"]
    nodes = {name for name, s in services.items() if "ray start" in " ".join(map(str, s.get("command") or []))}
    clients = {name for name, s in services.items() if "RAY_ADDRESS" in environment(s)}
    assert nodes == {"ray-head", "ray-worker"} and clients == {"prefect-worker", "vlmflow"}
    for name in nodes | clients:
        env = environment(services[name])
        assert compose_ray_token_ok(env), f"{name}: needs RAY_AUTH_MODE=token and ${{RAY_AUTH_TOKEN:?...}}"
    assert len({environment(services[name])["RAY_AUTH_TOKEN"] for name in nodes | clients}) == 1
    example = (INFRA / ".env.example").read_text().splitlines()
    assert "RAY_AUTH_TOKEN=" in example
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert all(str(p).startswith("127.0.0.1:") for p in ports), ports
    assert not any(str(p).endswith((":6379", ":10001")) for p in ports), "never publish the GCS or Ray Client"


def test_the_ray_cluster_launcher_starts_every_node_with_token_auth():
    config = load(INFRA / "ray" / "cluster.yaml")[0]
    assert config["docker"]["image"], "the start commands run in the container the options below configure"
    options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options
    assert "-e RAY_AUTH_TOKEN" in options, "the token comes from the host's environment (-e NAME)"
    assert not [o for o in options if re.search(r"RAY_AUTH_(TOKEN|TOKEN_PATH)=", o)], "no literal token"
    assert not [o for o in options if re.search(r"RAY_AUTH_MODE=(?!token\b)", o)]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert [c for c in starts if "ray start" in c], starts
    commands = starts + config["setup_commands"] + config["initialization_commands"]
    commands += config.get("head_setup_commands", []) + config.get("worker_setup_commands", [])
    for command in commands:  # none writes a token or switches the mode off
        assert not re.search(r"RAY_AUTH_MODE=(?!token\b)|RAY_AUTH_TOKEN=|auth_token", command), command
    assert "RAY_AUTH_TOKEN" not in json.dumps(config.get("file_mounts") or {})


def test_the_kuberay_cluster_and_its_clients_share_one_token_secret():
    docs = k8s_docs()
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert clusters
    for cluster in clusters:
        auth = cluster["spec"].get("authOptions") or {}
        assert auth.get("mode") == "token" and auth.get("secretName") == RAY_TOKEN_SECRET["name"]
        assert not auth.get("enableK8sTokenAuth"), "RayJobs do not support Kubernetes-delegated auth"
    templates = [t for d in docs for t in pod_templates(d)]
    callers = []
    for where, role, template in templates:
        containers = template["spec"]["containers"]
        calls_ray = role != "pod" or any("RAY_ADDRESS" in pod_env(c, k8s_configmaps()) for c in containers)
        if calls_ray:
            callers.append(where)
            ray_container = containers[0]  # KubeRay's Ray container / the submitter is the first
            assert has_k8s_ray_token_auth(ray_container), (
                f"{where}: RAY_AUTH_MODE=token + RAY_AUTH_TOKEN from {RAY_TOKEN_SECRET}"
            )
    expected = {"RayCluster/vlmflow/head", "RayCluster/vlmflow/cpu", "Deployment/prefect-worker"}
    assert expected | {"RayJob/vlmflow-run-/submitter"} <= set(callers), callers
    env = [entry for d in docs for key, entry in walk(d) if key == "env" and isinstance(entry, dict)]
    assert not [e["name"] for e in env if e["name"].startswith("RAY_AUTH_TOKEN") and "value" in e]
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created from infra/.env, never committed"


def network_policies() -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == "NetworkPolicy"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "keep selectors to matchLabels, which this test reads"
    return (selector.get("matchLabels") or {}).items() <= labels.items()


def admitted(policy: dict, labels: dict[str, str], port: int) -> bool:
    """Whether a pod with `labels` in the policy's namespace may connect to `port` (named ports aside)."""
    for rule in policy["spec"].get("ingress") or []:
        peers = rule.get("from")
        ports = {p.get("port") for p in rule.get("ports") or []}
        if rule.get("ports") and port not in ports:
            continue
        if peers is None or any("namespaceSelector" not in p and selects(p["podSelector"], labels) for p in peers):
            return True
    return False


def ray_pod_labels(cluster: dict, node_type: str) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod, plus the template's own."""
    spec = cluster["spec"]
    template = spec["headGroupSpec"]["template"] if node_type == "head" else spec["workerGroupSpecs"][0]["template"]
    return {**template_labels(template), "ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": node_type}


def test_network_policies_deny_by_default_and_admit_only_vlmflow_pods():
    kustomization = load(INFRA / "k8s" / "kustomization.yaml")[0]
    files = {p.name for p in (INFRA / "k8s").glob("*.yaml") if any(d.get("kind") == "NetworkPolicy" for d in load(p))}
    assert files and files <= set(kustomization["resources"]), "kubectl apply -k must apply the policies"
    policies = network_policies()
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"].get("policyTypes", [])
        and not p["spec"].get("ingress")
    ]
    assert deny, "a default-deny ingress policy (podSelector: {}, policyTypes: [Ingress], no rules)"
    stranger = {"app": "anything-else"}
    for policy in policies:
        assert "Ingress" in policy["spec"].get("policyTypes", []), policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress") or []:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{policy['metadata']['name']}: no IP ranges"
                if "namespaceSelector" in peer:  # another namespace: only the KubeRay operator, only 8265
                    assert peer["namespaceSelector"].get("matchLabels"), "name the namespace"
                    assert peer.get("podSelector", {}).get("matchLabels") == {
                        "app.kubernetes.io/name": "kuberay-operator"
                    }
                    assert {p["port"] for p in rule.get("ports", [])} == {8265}
                else:
                    assert PART_OF.items() <= peer["podSelector"].get("matchLabels", {}).items()
        assert not any(admitted(policy, stranger, port) for port in RAY_PORTS | {5000, 4200})


def test_the_ray_head_mlflow_and_prefect_admit_the_labelled_pods():
    docs = k8s_docs()
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = ray_pod_labels(cluster, "head")
    head_ports = {
        p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports >= RAY_PORTS
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    mlflow_labels = template_labels(mlflow["spec"]["template"])
    mlflow_port = next(p["port"] for s in docs if s["kind"] == "Service" for p in s["spec"]["ports"])
    prefect_port = urlparse(k8s_configmaps()["vlmflow-endpoints"]["data"]["PREFECT_API_URL"]).port
    targets = [(head, port) for port in RAY_PORTS] + [(mlflow_labels, mlflow_port)]
    targets.append(({"app.kubernetes.io/name": "prefect-server"}, prefect_port))  # Prefect's Helm chart
    policies = network_policies()
    client = {"app": "some-vlmflow-pod", **PART_OF}
    for labels, port in targets:
        selecting = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert any(p["spec"].get("ingress") for p in selecting), f"no policy selects {labels}"
        assert any(admitted(p, client, port) for p in selecting), f"{labels}:{port} does not admit {PART_OF}"
        assert not any(admitted(p, {"app": "other"}, port) for p in selecting)
    # Ray's node-to-node ports: the cluster's own pods reach each other on any port.
    worker = ray_pod_labels(cluster, "worker")
    for target in (head, worker):
        selecting = [p for p in policies if selects(p["spec"]["podSelector"], target)]
        assert any(admitted(p, worker, 52365) and admitted(p, head, 12345) for p in selecting)
        assert not any(admitted(p, PART_OF, 52365) for p in selecting), "other vlmflow pods: only 6379/8265/10001"
    # The KubeRay operator (another namespace) reaches the head's dashboard: RayJob status.
    head_policies = [p for p in policies if selects(p["spec"]["podSelector"], head)]
    peers = [(peer, rule) for p in head_policies for rule in p["spec"].get("ingress") or [] for peer in rule["from"]]
    operator = [(peer, rule) for peer, rule in peers if "namespaceSelector" in peer]
    assert operator, "admit the KubeRay operator to the dashboard, or RayJobs never finish"
    for peer, rule in operator:
        assert "kubernetes.io/metadata.name" in peer["namespaceSelector"]["matchLabels"]
        assert [p["port"] for p in rule["ports"]] == [8265]


def test_every_pod_that_calls_ray_mlflow_or_prefect_carries_the_label():
    configmaps = k8s_configmaps()
    calling, servers = [], []
    for doc in k8s_docs():
        for where, role, template in pod_templates(doc):
            env = set().union(*(pod_env(c, configmaps) for c in template["spec"]["containers"]))
            if role != "pod" or env & (CLIENT_VARS | {"RAY_AUTH_TOKEN"}):
                calling.append(where)
                assert PART_OF.items() <= template_labels(template).items(), f"{where} lacks {PART_OF}"
            else:
                servers.append((where, template))
    assert {"Deployment/prefect-worker", "RayCluster/vlmflow/head", "RayCluster/vlmflow/cpu"} <= set(calling)
    assert "RayJob/vlmflow-run-/submitter" in calling
    for where, template in servers:  # the label is the grant: not on pods that call nothing
        assert not PART_OF.items() <= template_labels(template).items(), f"{where} needs no access"
    for doc in k8s_docs():  # a Deployment's selector must still match its relabelled template
        if doc["kind"] == "Deployment":
            assert selects(doc["spec"]["selector"], template_labels(doc["spec"]["template"]))


def interpolated(value: str) -> set[str]:
    return {name for name, _, _ in INTERPOLATION.findall(value)}


def test_mlflow_uses_its_own_minio_user_limited_to_its_bucket():
    services = compose()["services"]
    mlflow = environment(services["mlflow"])
    key_vars = interpolated(mlflow["AWS_ACCESS_KEY_ID"]) | interpolated(mlflow["AWS_SECRET_ACCESS_KEY"])
    assert key_vars and not key_vars & ROOT_CREDENTIALS, "MLflow must not use MinIO's root credentials"
    for name, service in services.items():
        refs = set().union(*(interpolated(v) for v in environment(service).values()), set())
        refs |= interpolated(json.dumps(service.get("command") or []))
        if name not in {"minio", "minio-setup"}:
            assert not refs & ROOT_CREDENTIALS, f"{name} sees MinIO's root credentials"
    setup = services["minio-setup"]
    assert setup["image"].startswith("minio/mc:") and is_pinned(setup["image"])
    assert services["mlflow"]["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"
    setup_env = environment(setup)
    script = " ".join(setup["command"])
    bucket = urlparse(
        next(a for a in services["mlflow"]["command"] if a.startswith("--artifacts-destination=")).split("=", 1)[1]
    ).hostname
    assert f"mc mb --ignore-existing store/{bucket}" in script
    access = next(k for k, v in setup_env.items() if interpolated(v) == interpolated(mlflow["AWS_ACCESS_KEY_ID"]))
    secret = next(k for k, v in setup_env.items() if interpolated(v) == interpolated(mlflow["AWS_SECRET_ACCESS_KEY"]))
    assert f'mc admin user add store "$${access}" "$${secret}"' in script, "the user MLflow logs in as"
    policy_name = re.search(r"mc admin policy create store (\S+) (\S+)", script)
    assert policy_name, script
    assert f'mc admin policy attach store {policy_name[1]} --user "$${access}"' in script
    mount = next(v for v in setup["volumes"] if v.split(":")[1] == policy_name[2])
    assert mount.endswith(":ro")
    policy = json.loads((INFRA / mount.split(":")[0]).read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, resources
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    # Kubernetes: MinIO is not deployed there; the documented Secret gets the MLflow user's keys.
    readme = (INFRA / "README.md").read_text()
    mlflow_secret = readme[readme.index("create secret generic mlflow-server") :].split("\n\n")[0]
    assert 'AWS_ACCESS_KEY_ID="$MINIO_MLFLOW_ACCESS_KEY"' in mlflow_secret
    assert not ROOT_CREDENTIALS & set(re.findall(r"\$\{?([A-Z_]+)", mlflow_secret))


VALUE_LITERALS = [
    (re.compile(r"\b[0-9a-f]{32,}\b"), "a long hex string"),
    (re.compile(r"\b[A-Za-z0-9+/]{40,}={0,2}"), "a long base64 string"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (
        re.compile(r"--from-literal=\w+=(?:\"[^\"$]*\"|'[^'$]*'|[^\s\"'$]+)(?=\s|$)"),
        "kubectl --from-literal without a $VAR",
    ),
    (re.compile(r"\bRAY_AUTH_TOKEN[ \t]*[=:][ \t]*[\"']?[\w+/-]{8,}"), "a Ray token value"),
]


def committed_literals(path: Path, text: str) -> list[str]:
    text = re.sub(r"@sha256:[0-9a-f]{64}", "", text)  # image digests are not secrets
    return [f"{path}: {what}: {m.group(0)[:12]}..." for rx, what in VALUE_LITERALS for m in rx.finditer(text)]


def test_the_value_scanner_finds_committed_secrets():
    fake = [
        "RAY_AUTH_TOKEN=hunter2hunter2",
        "RAY_AUTH_TOKEN: 'hunter2hunter2'",
        "  --from-literal=auth_token=hunter2",
        '  --from-literal=AWS_SECRET_ACCESS_KEY="hunter2" \\',
        "token: " + "ab12" * 8,
        "- name: X\n  value: " + "Zm9v" * 12,
        "key: AKIA" + "A" * 16,
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ]
    assert [line for line in fake if not committed_literals(Path("fake"), line)] == []
    fine = [
        "RAY_AUTH_TOKEN=\n# a comment",
        "RAY_AUTH_TOKEN: ${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN in infra/.env}",
        '--from-literal=auth_token="$RAY_AUTH_TOKEN"',
        '--from-literal=URI="postgresql://vlmflow:$POSTGRES_PASSWORD@host:5432/mlflow" \\',
        "image: x@sha256:" + "a" * 64,
    ]
    assert [line for line in fine if committed_literals(Path("fake"), line)] == []


def test_no_secret_value_is_committed():
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name != ".env"]
    bad = [hit for path in files for hit in committed_literals(path, path.read_text())]
    readme = (ROOT / "README.md").read_text()  # its deployment section, which repeats these commands
    section = readme[readme.index("## Running beyond one laptop") :].split("\n## ", 1)[0]
    bad += committed_literals(ROOT / "README.md", section)
    assert bad == []
