"""Static checks of infra/: every file parses and holds what `make pipeline` and the security
defaults need. Nothing is started. Each checker returns a list of problems; the tests run them on
the real files and on deliberately broken copies, so a checker that never fails fails here."""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RAY_CLUSTER = INFRA / "ray" / "cluster.yaml"
KUBERAY_CLUSTER = INFRA / "kuberay" / "raycluster.yaml"
KUBERAY_JOB = INFRA / "kuberay" / "rayjob.yaml"
KUBERAY_DOCKERFILE = INFRA / "kuberay" / "Dockerfile"
COMPOSE = INFRA / "mlflow" / "docker-compose.yml"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
MLFLOW_ENV_EXAMPLE = INFRA / "mlflow" / ".env.example"
UNCLIP_ENV_EXAMPLE = INFRA / "unclip.env.example"

RAY_VERSION = importlib.metadata.version("ray")
MLFLOW_VERSION = importlib.metadata.version("mlflow")

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|ROOT_USER", re.I)
SECRET_REFERENCE_KEY = re.compile(r"(name|ref|path|file)$", re.I)  # names a secret, holds none
PLACEHOLDER = re.compile(r"^$|^change-me\b|^<[^>]*>$")
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en|p6-[a-z0-9]+)\.")
VAR_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")  # ${X} / ${X:?msg}, no default


def load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _walk_strings(node, path=""):
    """Yield (path, key, value) for every string value in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str):
                yield f"{path}.{k}", str(k), v
            else:
                yield from _walk_strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, str):
                yield f"{path}[{i}]", "", v
            else:
                yield from _walk_strings(v, f"{path}[{i}]")


_INLINE_SECRET = re.compile(
    r"(?i)\b(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|[A-Z_]*PASSWORD|[A-Z_]*TOKEN)=(?![$\"'\s]|$)")
_URI_USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://([^/\s:@]+):([^/\s@]+)@")


def literal_secrets(tree) -> list[str]:
    """Secret-named keys with literal values, `KEY=value` in commands, passwords inside URIs."""
    errors = []
    for where, key, value in _walk_strings(tree):
        if key and SECRET_NAME.search(key) and not SECRET_REFERENCE_KEY.search(key) \
                and value and "$" not in value:
            errors.append(f"{where}: literal value for secret {key!r}")
        if _INLINE_SECRET.search(value):
            errors.append(f"{where}: literal credential in {value!r}")
        for user, password in _URI_USERINFO.findall(value):
            if not (VAR_REF.match(password) or password.startswith("$")):
                errors.append(f"{where}: literal password in URI {value!r}")
    return errors


# --------------------------------------------------------------------------- Ray cluster launcher


def ray_schema_errors(cfg: dict) -> list[str]:
    """Ray's own checks: defaults merged the way `ray up` merges them, then ray-schema.json
    (jsonschema) and validate_config's cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError, RuntimeError, ...
        return [f"ray validate_config: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    return []


def check_ray_cluster(cfg, root: Path = ROOT) -> list[str]:
    if not isinstance(cfg, dict):
        return ["not a mapping"]
    errors = []
    for key, typ in [("cluster_name", str), ("max_workers", int), ("provider", dict), ("auth", dict),
                     ("docker", dict), ("available_node_types", dict), ("head_node_type", str),
                     ("file_mounts", dict), ("setup_commands", list),
                     ("head_start_ray_commands", list), ("worker_start_ray_commands", list)]:
        if not isinstance(cfg.get(key), typ):
            errors.append(f"{key}: missing or not {typ.__name__}")
    if errors:
        return errors
    errors += ray_schema_errors(cfg)
    if "type" not in cfg["provider"]:
        errors.append("provider.type missing")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    if head not in types:
        errors.append(f"head_node_type {head!r} not in available_node_types")
    else:
        res = types[head].get("resources", {})
        if res.get("CPU") != 0 or res.get("GPU", 0) != 0:
            errors.append(f"head node type must advertise CPU 0 and no GPU, has {res}")
    workers = {k: v for k, v in types.items() if k != head}
    if not workers:
        errors.append("no worker node type")
    for name, nt in workers.items():
        gpus = nt.get("resources", {}).get("GPU", 0)
        if not (isinstance(gpus, int) and gpus >= 1):
            errors.append(f"{name}: worker type does not provide GPUs (resources.GPU={gpus})")
        itype = nt.get("node_config", {}).get("InstanceType", "")
        if cfg["provider"].get("type") == "aws" and not GPU_INSTANCE.match(itype):
            errors.append(f"{name}: {itype!r} is not a GPU instance type")
        if nt.get("min_workers", 0) > nt.get("max_workers", cfg["max_workers"]):
            errors.append(f"{name}: min_workers > max_workers")
    if sum(nt.get("min_workers", 0) for nt in types.values()) > cfg["max_workers"]:
        errors.append("sum of min_workers exceeds max_workers")

    image = cfg["docker"].get("image", "")
    m = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py311-(?:gpu|cu\d+)", image)
    if not m:
        errors.append(f"docker.image {image!r} is not a pinned rayproject GPU image for Python 3.11")
    elif m.group(1) != RAY_VERSION:
        errors.append(f"docker.image has Ray {m.group(1)}, the client has {RAY_VERSION}")
    setup = " ".join(cfg["setup_commands"])
    if f"ray[data,train]=={RAY_VERSION}" not in setup:
        errors.append(f"setup_commands must pin ray[data,train]=={RAY_VERSION}")
    mounts = cfg["file_mounts"]
    repo_mounts = [remote for remote, local in mounts.items() if local in (".", "./")]
    if not repo_mounts:
        errors.append("file_mounts: the repository ('.') is not mounted")
    elif not any(f"-e {r}" in setup for r in repo_mounts):
        errors.append("setup_commands: no `pip install -e` of the mounted repository")
    for remote, local in mounts.items():
        src = root / local
        if not src.exists() and not Path(f"{src}.example").exists():
            errors.append(f"file_mounts[{remote}]: {local} neither exists nor has a .example")
    env_mounts = [r for r, local in mounts.items() if str(local).endswith(".env")]
    if not env_mounts:
        errors.append("file_mounts: no credentials env file for the Ray processes")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        if not start:
            errors.append(f"{key}: no `ray start`")
        for c in start:
            if not any(f". {r}" in c for r in env_mounts):
                errors.append(f"{key}: `ray start` does not load the env file {env_mounts}")
            if re.search(r"--dashboard-host[= ]0\.0\.0\.0", c):
                errors.append(f"{key}: dashboard bound to 0.0.0.0 (use `ray dashboard` to tunnel)")
    errors += literal_secrets(cfg)
    return errors


def test_ray_cluster_config_is_valid():
    assert check_ray_cluster(load(RAY_CLUSTER)) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c.update(head_node_type="nope"), "not in available_node_types"),
    (lambda c: c["available_node_types"]["gpu_a10g"]["resources"].pop("GPU"), "does not provide GPUs"),
    (lambda c: c["available_node_types"]["head"]["resources"].update(CPU=8), "CPU 0"),
    (lambda c: c["available_node_types"]["gpu_a10g"].update(resources={"GPU": "4"}), "validate_config"),
    (lambda c: c.update(max_workers=0), "min_workers"),
    (lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"), "pinned rayproject"),
    (lambda c: c.update(setup_commands=["pip install -e ~/unclip"]), "must pin ray"),
    (lambda c: c["head_start_ray_commands"].append("ray start --head --dashboard-host=0.0.0.0"),
     "0.0.0.0"),
    (lambda c: c["setup_commands"].append("export AWS_SECRET_ACCESS_KEY=abc123"), "literal credential"),
])
def test_ray_cluster_checker_rejects_broken_copies(breakage, expected):
    cfg = load(RAY_CLUSTER)
    breakage(cfg)
    errors = check_ray_cluster(cfg)
    assert any(expected in e for e in errors), errors


# --------------------------------------------------------------------------- KubeRay


def _containers(group: dict) -> list[dict]:
    return (group.get("template") or {}).get("spec", {}).get("containers") or []


def check_kuberay_cluster_spec(spec) -> list[str]:
    if not isinstance(spec, dict):
        return ["cluster spec: not a mapping"]
    errors = []
    if str(spec.get("rayVersion")) != RAY_VERSION:
        errors.append(f"rayVersion {spec.get('rayVersion')!r} != client Ray {RAY_VERSION}")
    head = spec.get("headGroupSpec")
    workers = spec.get("workerGroupSpecs")
    if not isinstance(head, dict):
        return errors + ["headGroupSpec missing"]
    if not isinstance(workers, list) or not workers:
        return errors + ["workerGroupSpecs missing or empty"]
    groups = [("head", head)] + [(w.get("groupName", f"worker{i}"), w) for i, w in enumerate(workers)]
    images = set()
    for name, group in groups:
        params = group.get("rayStartParams", {})
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            errors.append(f"{name}: rayStartParams must map to strings")
        containers = _containers(group)
        if not containers:
            errors.append(f"{name}: no containers in template.spec")
        for c in containers:
            image = c.get("image", "")
            images.add(image)
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                errors.append(f"{name}: image {image!r} has no pinned tag")
            if not any("secretRef" in e for e in c.get("envFrom", [])):
                errors.append(f"{name}: credentials not taken from a Secret (envFrom.secretRef)")
            for env in c.get("env", []):
                if SECRET_NAME.search(env.get("name", "")) and "value" in env:
                    errors.append(f"{name}: env {env['name']} has a literal value, use secretKeyRef")
    auth = spec.get("authOptions") or {}
    if auth.get("mode", "token") != "token" or not isinstance(auth.get("secretName"), str):
        errors.append("authOptions: token auth with a named Secret required (dashboard on the pod network)")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        errors.append("head: rayStartParams num-cpus must be \"0\" (no work on the head)")
    if len(images) > 1:
        errors.append(f"head and workers use different images: {sorted(images)}")
    for w in workers:
        name = w.get("groupName")
        if not isinstance(name, str):
            errors.append("worker group without groupName")
        lo, n, hi = (w.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if not all(isinstance(x, int) for x in (lo, n, hi)) or not lo <= n <= hi:
            errors.append(f"{name}: need integers minReplicas <= replicas <= maxReplicas")
        for c in _containers(w):
            res = c.get("resources", {})
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if not str(gpus).isdigit() or int(gpus) < 1:
                errors.append(f"{name}: container {c.get('name')} has no nvidia.com/gpu limit")
            req = res.get("requests", {}).get("nvidia.com/gpu")
            if req is not None and str(req) != str(gpus):
                errors.append(f"{name}: nvidia.com/gpu request differs from limit")
        tolerations = (w.get("template") or {}).get("spec", {}).get("tolerations", [])
        if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
            errors.append(f"{name}: no toleration for the nvidia.com/gpu taint")
    errors += literal_secrets(spec)
    return errors


def check_raycluster(doc) -> list[str]:
    if not isinstance(doc, dict):
        return ["not a mapping"]
    errors = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayCluster":
        errors.append(f"expected ray.io/v1 RayCluster, got {doc.get('apiVersion')} {doc.get('kind')}")
    if not isinstance((doc.get("metadata") or {}).get("name"), str):
        errors.append("metadata.name missing")
    return errors + check_kuberay_cluster_spec(doc.get("spec"))


def check_rayjob(doc) -> list[str]:
    from pipelines.config import load_config
    from pipelines.runtime import IN_JOB_ENV

    if not isinstance(doc, dict):
        return ["not a mapping"]
    errors = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        errors.append(f"expected ray.io/v1 RayJob, got {doc.get('apiVersion')} {doc.get('kind')}")
    spec = doc.get("spec") or {}
    argv = shlex.split(spec.get("entrypoint") or "")
    if argv[:4] != ["python", "-m", "pipelines", "run"]:
        errors.append(f"entrypoint does not run `python -m pipelines run`: {argv}")
    else:
        overrides = argv[4:]
        run_dir = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
        if not run_dir or not run_dir[0].startswith("s3://"):
            errors.append("entrypoint: run_dir must be shared storage (s3://...)")
        try:
            load_config(overrides)
        except Exception as exc:
            errors.append(f"entrypoint overrides do not compose: {exc}")
    if spec.get("submissionMode", "K8sJobMode") not in (
            "K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"):
        errors.append(f"unknown submissionMode {spec.get('submissionMode')!r}")
    if not isinstance(spec.get("shutdownAfterJobFinishes"), bool):
        errors.append("shutdownAfterJobFinishes must be a boolean")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not (isinstance(ttl, int) and ttl >= 0):
        errors.append("ttlSecondsAfterFinished must be an integer >= 0")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        errors.append("exactly one of rayClusterSpec / clusterSelector")
    if "rayClusterSpec" in spec:
        errors += check_kuberay_cluster_spec(spec["rayClusterSpec"])
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    except yaml.YAMLError as exc:
        return errors + [f"runtimeEnvYAML does not parse: {exc}"]
    env_vars = runtime_env.get("env_vars", {})
    if env_vars.get(IN_JOB_ENV) != "1":
        errors.append(f"runtimeEnvYAML env_vars must set {IN_JOB_ENV}=\"1\" (stages run in the driver)")
    for name in env_vars:
        if SECRET_NAME.search(name):
            errors.append(f"runtimeEnvYAML: secret {name} would show in the dashboard")
    return errors


def test_raycluster_is_valid():
    assert check_raycluster(load(KUBERAY_CLUSTER)) == []


def test_rayjob_is_valid_and_embeds_the_raycluster_spec():
    job = load(KUBERAY_JOB)
    assert check_rayjob(job) == []
    assert job["spec"]["rayClusterSpec"] == load(KUBERAY_CLUSTER)["spec"]


def _worker(doc):
    return doc["spec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "expected ray.io/v1 RayCluster"),
    (lambda d: _containers(_worker(d))[0]["resources"]["limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu limit"),
    (lambda d: _worker(d)["template"]["spec"].pop("tolerations"), "toleration"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    (lambda d: _worker(d).update(minReplicas=5), "minReplicas <= replicas"),
    (lambda d: _containers(_worker(d))[0].update(
        env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]), "literal value"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}), "strings"),
    (lambda d: d["spec"].pop("authOptions"), "authOptions"),
    (lambda d: d["spec"]["authOptions"].update(mode="disabled"), "authOptions"),
])
def test_raycluster_checker_rejects_broken_copies(breakage, expected):
    doc = load(KUBERAY_CLUSTER)
    breakage(doc)
    errors = check_raycluster(doc)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("breakage, expected", [
    (lambda s: s.update(entrypoint="python train.py"), "python -m pipelines run"),
    (lambda s: s.update(entrypoint="python -m pipelines run preset=paper run_dir=/tmp/x"), "s3://"),
    (lambda s: s.update(entrypoint="python -m pipelines run preset=nope run_dir=s3://b/r"), "compose"),
    (lambda s: s.update(submissionMode="Magic"), "submissionMode"),
    (lambda s: s.update(runtimeEnvYAML="env_vars: {}"), "UNCLIP_IN_RAY_JOB"),
    (lambda s: s.update(clusterSelector={"ray.io/cluster": "unclip"}), "exactly one"),
    (lambda s: s.update(ttlSecondsAfterFinished="600"), "ttlSecondsAfterFinished"),
])
def test_rayjob_checker_rejects_broken_copies(breakage, expected):
    doc = load(KUBERAY_JOB)
    breakage(doc["spec"])
    errors = check_rayjob(doc)
    assert any(expected in e for e in errors), errors


def test_kuberay_image_matches_client_ray():
    text = KUBERAY_DOCKERFILE.read_text()
    assert f"ARG RAY_VERSION={RAY_VERSION}\n" in text
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    assert '"ray[data,train]==${RAY_VERSION}"' in text and "pip install --no-cache-dir --no-deps -e ." in text


# --------------------------------------------------------------------------- MLflow compose

_COMPOSE_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose variable interpolation: $$, $X, ${X}, ${X:-d}, ${X-d}, ${X:?e}, ${X?e}, ${X:+r}."""

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        expr = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", m.group("braced"), re.S)
        if not expr:
            raise ValueError(f"bad interpolation ${{{m.group('braced')}}}")
        name, op, arg = expr.groups()
        val = env.get(name)
        is_set = val is not None and (val != "" or not (op or "").startswith(":"))
        if op is None:
            return val or ""
        if op.endswith("-"):
            return val if is_set else interpolate(arg, env)
        if op.endswith("+"):
            return interpolate(arg, env) if is_set else ""
        if not is_set:  # ? / :?
            raise KeyError(f"{name}: {arg}")
        return val

    return _COMPOSE_VAR.sub(sub, value)


def parse_env_file(text: str) -> tuple[dict[str, str], list[str]]:
    env, errors = {}, []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        if not m:
            errors.append(f"line {n}: not KEY=VALUE: {line!r}")
            continue
        key, value = m.groups()
        if value[:1] in ('"', "'") or " " in value:
            errors.append(f"line {n}: {key}: quotes or spaces (values are taken literally)")
        env[key] = value
    return env, errors


def check_env_example(text: str) -> list[str]:
    env, errors = parse_env_file(text)
    for key, value in env.items():
        if SECRET_NAME.search(key) and not PLACEHOLDER.match(value):
            errors.append(f"{key}: {value!r} is not a placeholder (empty, change-me..., <...>)")
    return errors


def _published_host_ips(ports) -> list[tuple[str, str | None]]:
    """(port spec, host ip or None when bound to all interfaces)."""
    out = []
    for p in ports:
        if isinstance(p, dict):  # long syntax
            if p.get("published") is not None:
                out.append((str(p), p.get("host_ip")))
            continue
        spec = str(p).split("/", 1)[0]
        m = re.fullmatch(r"(\[[^\]]+\]|[^:]+):([^:]+):([^:]+)", spec)
        out.append((str(p), m.group(1) if m else None))
    return out


def _argv(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command or []]


def _opt(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _env_items(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _depends(service: dict) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def check_compose(doc, env: dict[str, str], raw_text: str = "") -> list[str]:
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        return ["no services mapping"]
    errors = []
    services = doc["services"]
    for name in ("mlflow", "postgres", "minio", "minio-init"):
        if name not in services:
            errors.append(f"service {name!r} missing")
    if errors:
        return errors

    # Published ports: loopback only, after interpolation with the given .env.
    for name, svc in services.items():
        if svc.get("network_mode") == "host":
            errors.append(f"{name}: network_mode host publishes every port on all interfaces")
        try:
            ports = [interpolate(p, env) if isinstance(p, str) else p for p in svc.get("ports", [])]
        except KeyError as exc:
            errors.append(f"{name}: ports: required variable unset: {exc}")
            continue
        for spec, ip in _published_host_ips(ports):
            if ip not in LOOPBACK:
                errors.append(f"{name}: port {spec!r} is not bound to 127.0.0.1")

    # Secrets: only ${VAR} references (no defaults) for secret-named variables; none in commands.
    for name, svc in services.items():
        for key, value in _env_items(svc).items():
            if SECRET_NAME.search(key) and not VAR_REF.match(value):
                errors.append(f"{name}: environment {key} must be a ${{VAR}} reference from .env")
    errors += literal_secrets(doc)
    if raw_text:
        for m in re.finditer(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", raw_text):
            if m.group(2) in (None, "?", ":?") and m.group(1) not in env:
                errors.append(f"${{{m.group(1)}}} is used without a default but not defined in .env")

    # Health checks and start order.
    for name, svc in services.items():
        one_shot = str(svc.get("restart", "")) == "no"
        test = (svc.get("healthcheck") or {}).get("test")
        if not one_shot and (not test or test in (["NONE"], "NONE")
                             or (svc.get("healthcheck") or {}).get("disable")):
            errors.append(f"{name}: no healthcheck")
        for dep, cond in _depends(svc).items():
            if dep not in services:
                errors.append(f"{name}: depends_on unknown service {dep!r}")
            elif cond == "service_healthy" and not (services[dep].get("healthcheck") or {}).get("test"):
                errors.append(f"{name}: waits for {dep} healthy, but {dep} has no healthcheck")
    for name, dep, cond in [("mlflow", "postgres", "service_healthy"),
                            ("mlflow", "minio-init", "service_completed_successfully"),
                            ("minio-init", "minio", "service_healthy")]:
        if _depends(services[name]).get(dep) != cond:
            errors.append(f"{name}: must depend on {dep} with condition {cond}")

    # Data on named volumes declared at the top level.
    declared = set((doc.get("volumes") or {}).keys())
    for name in ("postgres", "minio"):
        named = [str(v).split(":", 1)[0] for v in services[name].get("volumes", [])
                 if isinstance(v, str) and not str(v).startswith((".", "/", "~", "$"))]
        if not named:
            errors.append(f"{name}: data not on a named volume")
        for v in named:
            if v not in declared:
                errors.append(f"{name}: volume {v!r} not declared under top-level volumes")

    # The tracking server: Postgres backend store, S3 (MinIO) artifacts, listening in the container.
    mlflow = services["mlflow"]
    try:
        argv = [interpolate(a, env) for a in _argv(mlflow.get("command"))]
    except KeyError as exc:
        return errors + [f"mlflow: command: required variable unset: {exc}"]
    if argv[:2] != ["mlflow", "server"]:
        errors.append(f"mlflow: command is not `mlflow server`: {argv[:2]}")
    backend = _opt(argv, "--backend-store-uri") or ""
    if not re.match(r"postgresql(\+psycopg2)?://[^@]+@postgres:5432/", backend):
        errors.append("mlflow: --backend-store-uri is not postgresql://...@postgres:5432/...")
    artifacts = _opt(argv, "--artifacts-destination") or ""
    if not artifacts.startswith("s3://"):
        errors.append("mlflow: --artifacts-destination is not s3://...")
    else:
        bucket = artifacts[5:].split("/", 1)[0]
        init = " ".join(_argv(services["minio-init"].get("command")))
        if f"local/{bucket}" not in init:
            errors.append(f"minio-init does not create the artifact bucket {bucket!r}")
    if _opt(argv, "--host") != "0.0.0.0":
        errors.append("mlflow: --host must be 0.0.0.0 inside the container (the host side is the port)")
    port = _opt(argv, "--port") or "5000"
    if not any(str(p).split("/")[0].endswith(f":{port}") for p in mlflow.get("ports", [])):
        errors.append(f"mlflow: container port {port} is not published")
    mlflow_env = _env_items(mlflow)
    if interpolate(mlflow_env.get("MLFLOW_S3_ENDPOINT_URL", ""), env) != "http://minio:9000":
        errors.append("mlflow: MLFLOW_S3_ENDPOINT_URL must point at http://minio:9000")
    return errors


def _compose_envs() -> list[dict[str, str]]:
    env, _ = parse_env_file(MLFLOW_ENV_EXAMPLE.read_text())
    defaults = {k: v for k, v in env.items() if not k.endswith("_BIND_ADDRESS")}
    return [env, defaults]


def test_compose_is_valid():
    raw = COMPOSE.read_text()
    for env in _compose_envs():
        assert check_compose(yaml.safe_load(raw), env, raw) == []


def test_env_examples_hold_only_placeholders():
    assert check_env_example(MLFLOW_ENV_EXAMPLE.read_text()) == []
    assert check_env_example(UNCLIP_ENV_EXAMPLE.read_text()) == []
    assert check_env_example("POSTGRES_PASSWORD=hunter2\n")
    assert check_env_example("AWS_SECRET_ACCESS_KEY=\"change-me\"\n")
    assert check_env_example("not an assignment\n")


def test_every_env_example_key_is_used():
    env, _ = parse_env_file(MLFLOW_ENV_EXAMPLE.read_text())
    raw = COMPOSE.read_text()
    assert [k for k in env if not re.search(rf"\$\{{{k}\b", raw)] == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d["services"]["mlflow"].update(ports=["0.0.0.0:5000:5000"]), "not bound to 127.0.0.1"),
    (lambda d: d["services"]["mlflow"].update(ports=["5000:5000"]), "not bound to 127.0.0.1"),
    (lambda d: d["services"]["minio"].update(ports=[{"target": 9000, "published": 9000}]),
     "not bound to 127.0.0.1"),
    (lambda d: d["services"]["mlflow"].update(ports=["${MLFLOW_BIND_ADDRESS:-0.0.0.0}:5000:5000"]),
     "not bound to 127.0.0.1"),
    (lambda d: d["services"]["postgres"].update(network_mode="host"), "network_mode host"),
    (lambda d: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2"),
     "POSTGRES_PASSWORD must be a ${VAR}"),
    (lambda d: d["services"]["minio"]["environment"].update(MINIO_ROOT_PASSWORD="${MINIO_ROOT_PASSWORD:-minio123}"),
     "MINIO_ROOT_PASSWORD must be a ${VAR}"),
    (lambda d: d["services"]["mlflow"].update(command=[
        "mlflow", "server", "--backend-store-uri", "postgresql://mlflow:hunter2@postgres:5432/mlflow",
        "--artifacts-destination", "s3://mlflow/", "--host", "0.0.0.0", "--port", "5000"]),
     "literal password in URI"),
    (lambda d: d["services"]["mlflow"].update(command=[
        "mlflow", "server", "--backend-store-uri", "sqlite:///mlflow.db", "--artifacts-destination",
        "s3://mlflow/", "--host", "0.0.0.0", "--port", "5000"]), "--backend-store-uri"),
    (lambda d: d["services"]["mlflow"].update(command=[
        "mlflow", "server", "--backend-store-uri", "postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/x",
        "--artifacts-destination", "s3://other/", "--host", "0.0.0.0", "--port", "5000"]),
     "artifact bucket 'other'"),
    (lambda d: d["services"]["postgres"].pop("healthcheck"), "postgres: no healthcheck"),
    (lambda d: d["services"]["mlflow"].update(depends_on=["postgres", "minio-init"]), "condition"),
    (lambda d: d["services"]["minio-init"].update(depends_on={"minio": {"condition": "service_started"}}),
     "minio-init: must depend on minio"),
    (lambda d: d.pop("volumes"), "not declared"),
    (lambda d: d["services"].pop("minio"), "'minio' missing"),
])
def test_compose_checker_rejects_broken_copies(breakage, expected):
    doc = load(COMPOSE)
    env = _compose_envs()[1]  # the .env.example without the *_BIND_ADDRESS choices: defaults apply
    breakage(doc)
    errors = check_compose(doc, env)
    assert any(expected in e for e in errors), errors


def test_compose_checker_rejects_deliberate_exposure_and_unset_secrets():
    raw = COMPOSE.read_text()
    env = dict(_compose_envs()[0], MLFLOW_BIND_ADDRESS="0.0.0.0")
    assert any("mlflow: port" in e for e in check_compose(yaml.safe_load(raw), env, raw))
    env = {k: v for k, v in _compose_envs()[0].items() if k != "POSTGRES_PASSWORD"}
    assert any("POSTGRES_PASSWORD" in e for e in check_compose(yaml.safe_load(raw), env, raw))


def test_interpolate():
    env = {"A": "a", "E": ""}
    assert interpolate("$$A ${A} $A ${B:-d} ${E:-d} ${E-d} ${A:+r} ${B+r}", env) == "$A a a d d  r "
    with pytest.raises(KeyError):
        interpolate("${E:?must be set}", env)


def test_mlflow_image_installs_drivers_for_the_client_major_version():
    text = MLFLOW_DOCKERFILE.read_text()
    m = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", text, re.M)
    assert m and m.group(1).split(".")[0] == MLFLOW_VERSION.split(".")[0]
    assert re.search(r"^FROM ghcr\.io/mlflow/mlflow:v\$\{MLFLOW_VERSION\}$", text, re.M)
    assert "psycopg2" in text and "boto3" in text
    assert load(COMPOSE)["services"]["mlflow"]["build"]["args"]["MLFLOW_VERSION"] == m.group(1)


# --------------------------------------------------------------------------- credentials files


def test_credentials_files_never_reach_git_a_job_upload_or_an_image(tmp_path):
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches .rayignore with

    for ignore in (INFRA / ".gitignore", INFRA / ".rayignore"):
        spec = PathSpec.from_lines("gitwildmatch", ignore.read_text().splitlines())
        assert spec.match_file("unclip.env") and spec.match_file("mlflow/.env"), ignore
        assert not spec.match_file("unclip.env.example") and not spec.match_file("mlflow/.env.example")
    spec = PathSpec.from_lines(
        "gitwildmatch", (INFRA / "kuberay" / "Dockerfile.dockerignore").read_text().splitlines())
    for path in ("infra/unclip.env", "infra/mlflow/.env", ".venv/bin/python", ".git/config"):
        assert spec.match_file(path), path

    # What Ray actually uploads as a job's working_dir (the runner ships the repository).
    from ray._private.runtime_env.packaging import _dir_travel

    infra = tmp_path / "infra"
    shutil.copytree(INFRA, infra)
    (infra / "unclip.env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (infra / "mlflow" / ".env").write_text("POSTGRES_PASSWORD=x\n")
    uploaded: list[Path] = []
    _dir_travel(tmp_path, [], uploaded.append, include_gitignore=False)  # .rayignore alone
    names = {p.relative_to(tmp_path).as_posix() for p in uploaded}
    assert "infra/unclip.env.example" in names and "infra/mlflow/docker-compose.yml" in names
    assert "infra/unclip.env" not in names and "infra/mlflow/.env" not in names


def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.y*ml"))
    assert {RAY_CLUSTER, KUBERAY_CLUSTER, KUBERAY_JOB, COMPOSE} <= set(files)
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path


def test_readme_commands_name_existing_files():
    readme = (INFRA / "README.md").read_text()
    for needle in ("ray up -y infra/ray/cluster.yaml", "ray dashboard infra/ray/cluster.yaml",
                   "RAY_ADDRESS=http://127.0.0.1:8265", "kubectl apply -f infra/kuberay/raycluster.yaml",
                   "kubectl apply -f infra/kuberay/rayjob.yaml", "docker compose --env-file .env up -d"):
        assert needle in readme, needle
    for ref in set(re.findall(r"infra/[\w./-]+", readme)):
        ref = ref.rstrip(".")
        if not ref.endswith((".env",)):  # created by the user from the .example
            assert (ROOT / ref).exists(), ref
