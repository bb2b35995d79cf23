"""docker-compose.yml and the Dockerfile, checked without Docker.

The compose file is parsed and its services checked for consistency (images and build targets,
environment, healthchecks, dependencies, profiles, the files it mounts). Then every service that
runs Cohort's code is started here with its own command, environment and config (the ``redis``
host mapped to a password-protected redis-server of the test's own, ports mapped to free ones,
``/var/lib/cohort`` to a temporary directory) and its compose healthcheck is run locally until it
passes, as Docker would run it inside the container.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from producers.settings import read_config
from workers.settings import worker_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
HEALTH_TIMEOUT_S = 75.0

# The variables compose needs, as an operator would set them.
TEST_ENV = {
    "REDIS_PASSWORD": "compose-test-redis-password",
    "COHORT_API_KEYS": "compose-test-api-key-0123456789",
    "COHORT_MONITOR_PASSWORD": "compose-test-monitor-password",
    "FLOWER_BASIC_AUTH": "admin:compose-test-flower-password",
    "GRAFANA_ADMIN_PASSWORD": "compose-test-grafana-password",
}
OUR_IMAGES = ("cohort-worker", "cohort-gpu", "cohort-api", "cohort-monitor", "cohort-sim")
# The service commands the project settled on (the inference pool and concurrency are the
# deployment's measured default; see docs/deployment.md).
COMMANDS = {
    "grouper": "celery -A workers.app worker -Q grouper -P solo -c 1 -n grouper@%h -l info",
    "gpu": "celery -A workers.app worker -Q gpu -P solo -c 1 -n gpu@%h -l info",
    "beat": "celery -A workers.app beat -l info -s /var/lib/cohort/celerybeat-schedule",
    "api": "python -m ops.api --host 0.0.0.0 --port 8000",
    "monitor": "python -m ops.monitor --host 0.0.0.0 --port 9808",
    "flower": f"celery -A workers.app flower --port=5555 --basic-auth={TEST_ENV['FLOWER_BASIC_AUTH']}",
    "simulator": "python -m ops.simulator --host 0.0.0.0 --port 8900",
}
INFERENCE_COMMAND = re.compile(
    r"^celery -A workers\.app worker -Q inference -P (threads|gevent|prefork) -c \d+ -n inference@%h -l info$")


# --- compose's variable interpolation ----------------------------------------------------------
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return env.get(match.group("plain"), "")
        expr = match.group("braced")
        found = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])(.*))?$", expr, re.S)
        if not found:
            raise ValueError(f"bad substitution ${{{expr}}}")
        name, colon, op, arg = found.groups()
        present = name in env and (not colon or env[name] != "")
        if present:
            return env[name]
        if op == "-":
            return arg
        if op == "?":
            raise MissingVariable(f"{name}: {arg}")
        return ""

    return _VAR.sub(one, value)


def load_compose(env: Mapping[str, str]) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(TEST_ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _ours(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] in OUR_IMAGES


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _health_test(service: dict[str, Any]) -> list[str]:
    return list(service["healthcheck"]["test"]) if isinstance(service["healthcheck"]["test"], list) \
        else ["CMD-SHELL", service["healthcheck"]["test"]]


def _stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M | re.I))


# --- static checks -----------------------------------------------------------------------------
def test_required_variables_fail_fast() -> None:
    for name in ("REDIS_PASSWORD", "COHORT_API_KEYS", "COHORT_MONITOR_PASSWORD", "FLOWER_BASIC_AUTH"):
        with pytest.raises(MissingVariable, match=name):
            load_compose({k: v for k, v in TEST_ENV.items() if k != name})


def test_every_service_has_an_image_and_a_known_build_target(services: dict[str, dict[str, Any]]) -> None:
    stages = _stages()
    assert {"api", "monitor", "worker", "gpu", "sim"} <= stages
    for name, service in services.items():
        assert service.get("image"), f"{name}: no image"
        if _ours(service):
            assert service["build"]["context"] == "."
            assert service["build"]["target"] in stages, f"{name}: unknown build target"
            assert service["image"].split(":")[0] == f"cohort-{service['build']['target']}", name
        else:
            assert "build" not in service
            tag = service["image"].rsplit(":", 1)
            assert len(tag) == 2 and tag[1] not in ("", "latest"), f"{name}: third-party image must be pinned"


def test_the_service_commands(services: dict[str, dict[str, Any]]) -> None:
    for name, command in COMMANDS.items():
        assert " ".join(_command(services[name])) == command, name
    assert INFERENCE_COMMAND.match(" ".join(_command(services["inference"])))


def test_cohort_services_share_one_config_and_redis(compose: dict[str, Any],
                                                   services: dict[str, dict[str, Any]]) -> None:
    config_target = None
    for name, service in services.items():
        if not _ours(service) or name == "simulator":
            continue
        env = service["environment"]
        assert env["COHORT_REDIS_URL"] == f"redis://:{TEST_ENV['REDIS_PASSWORD']}@redis:6379/0", name
        mounts = {c["source"]: c["target"] for c in service["configs"]}
        assert mounts.get("cohort_config") == env["COHORT_CONFIG"], name
        config_target = config_target or env["COHORT_CONFIG"]
        assert env["COHORT_CONFIG"] == config_target, f"{name}: another config"
        assert env.get("HF_HUB_OFFLINE") == "1", name
    assert services["api"]["environment"]["COHORT_API_KEYS"] == TEST_ENV["COHORT_API_KEYS"]
    assert services["monitor"]["environment"]["COHORT_MONITOR_PASSWORD"] == TEST_ENV["COHORT_MONITOR_PASSWORD"]
    assert compose["configs"]["prometheus_monitor_password"]["content"] == TEST_ENV["COHORT_MONITOR_PASSWORD"]
    # No secret is written into the config file.
    content = compose["configs"]["cohort_config"]["content"]
    assert not any(value in content for value in TEST_ENV.values())


def test_healthchecks_use_what_each_image_has(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "healthcheck" in service, f"{name}: no healthcheck"
        test = _health_test(service)
        assert test[0] in ("CMD", "CMD-SHELL"), name
        text = " ".join(test)
        if _ours(service):
            # Cohort's images are slim Python images: no curl, no wget.
            assert test[:2] == ["CMD", "python"], f"{name}: healthcheck must run python"
            assert "curl" not in text and "wget" not in text
        for key in ("interval", "timeout"):
            assert re.fullmatch(r"\d+s", str(service["healthcheck"][key])), f"{name}.{key}"


def test_dependencies_are_consistent(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        depends = {d: {"condition": "service_started"} for d in depends} if isinstance(depends, list) else depends
        profiles = set(service.get("profiles", []))
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert spec["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
            target_profiles = set(services[target].get("profiles", []))
            # A dependency must be enabled whenever the dependent is.
            assert not target_profiles or (profiles and profiles <= target_profiles), \
                f"{name} depends on {target}, which only runs in profiles {sorted(target_profiles)}"
        if _ours(service) and name != "simulator":
            assert depends.get("redis", {}).get("condition") == "service_healthy", f"{name} must wait for Redis"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle {' -> '.join(path + (name,))}"
        for target in services[name].get("depends_on", {}):
            visit(target, path + (name,))

    for name in services:
        visit(name, ())


def test_roles(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    redis_command = " ".join(_command(services["redis"]))
    assert "--appendonly yes" in redis_command and "--requirepass" in redis_command
    assert any(str(v).endswith(":/data") for v in services["redis"]["volumes"])
    # Beat: exactly one, its schedule on a volume.
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    assert any(str(v).endswith(":/var/lib/cohort") for v in services["beat"]["volumes"])
    # Inference workers scale with --scale: no fixed container name, host port or node name.
    inference = services["inference"]
    assert "container_name" not in inference and "ports" not in inference and "hostname" not in inference
    assert "@%h" in " ".join(_command(inference))
    # GPU workers: an NVIDIA device reservation, a profile of their own.
    devices = services["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["gpu"]["profiles"] == ["gpu"]
    assert services["simulator"]["profiles"] == ["demo"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert "--basic-auth=" in " ".join(_command(services["flower"]))
    assert compose["volumes"].keys() >= {"redis-data", "beat-schedule"}


def test_monitoring_files_exist_and_point_at_the_services(services: dict[str, dict[str, Any]]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    prometheus = yaml.safe_load((REPO / "ops/prometheus/prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for target in targets:
        host, port = target.split(":")
        assert host in services, f"prometheus scrapes {target}: no such service"
        assert any(str(p).endswith(f":{port}") for p in services[host].get("ports", [])) \
            or f"--port {port}" in " ".join(_command(services[host])) \
            or f"--port={port}" in " ".join(_command(services[host])), target
    password_file = next(j["basic_auth"]["password_file"] for j in prometheus["scrape_configs"] if "basic_auth" in j)
    assert password_file in {c["target"] for c in services["prometheus"]["configs"]}
    assert services["monitor"]["environment"]["COHORT_MONITOR_USER"] == next(
        j["basic_auth"]["username"] for j in prometheus["scrape_configs"] if "basic_auth" in j)
    datasources = yaml.safe_load((REPO / "ops/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((REPO / "ops/grafana/provisioning/dashboards/cohort.yml").read_text())
    dashboards_dir = providers["providers"][0]["options"]["path"]
    assert any(str(v).split(":")[1].startswith(dashboards_dir + "/") for v in services["grafana"]["volumes"])


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 4
    blocks = re.split(r"^FROM ", text, flags=re.M)[1:]
    for block in blocks:
        stage = re.match(r"\S+\s+AS\s+(\S+)", block, re.I)
        if stage and stage.group(1) in ("api", "monitor", "worker", "gpu", "sim"):
            users = re.findall(r"^USER\s+(\S+)", block, re.M)
            assert users and not users[-1].startswith(("root", "0")), f"{stage.group(1)} runs as root"
            assert "COPY --from=build-" in block, f"{stage.group(1)} must copy a built environment"
    assert "download.pytorch.org/whl/cpu" in text  # the CPU worker image does not pull CUDA
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_config_the_services_read_is_valid(compose: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "cohort.toml"
    path.write_text(compose["configs"]["cohort_config"]["content"])
    env = services_env(compose["services"]["inference"])
    settings = worker_settings(read_config(path, env), env)
    assert settings.producer.redis.url == env["COHORT_REDIS_URL"]
    assert all(tier["base_url"].startswith("http://simulator:8900/") for tier in settings.config["tiers"])


def services_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


# --- the services, started here ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Local:
    """Maps a compose service onto this machine: hosts, ports, paths, executables."""

    def __init__(self, tmp: Path, redis_port: int, ports: dict[int, int]) -> None:
        self.tmp = tmp
        self.redis_port = redis_port
        self.ports = ports
        self.bin = Path(sys.executable).parent

    def text(self, value: str) -> str:
        value = value.replace("@redis:6379", f"@127.0.0.1:{self.redis_port}")
        value = value.replace("/var/lib/cohort", str(self.tmp / "var-lib-cohort"))
        value = value.replace("--host 0.0.0.0", "--host 127.0.0.1")
        for old, new in self.ports.items():
            value = re.sub(rf"(--port[ =]|127\.0\.0\.1:|simulator:){old}\b", rf"\g<1>{new}", value)
        return value.replace("http://simulator:", "http://127.0.0.1:")

    def argv(self, argv: list[str]) -> list[str]:
        argv = shlex.split(self.text(shlex.join(argv)))
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "celery":
            argv[0] = str(self.bin / "celery")
        return argv

    def shell(self, command: str) -> str:
        return self.text(command).replace("redis-cli ", f"redis-cli -p {self.redis_port} ")


def _healthy(local: Local, service: dict[str, Any], env: dict[str, str]) -> bool:
    test = _health_test(service)
    argv = ["sh", "-c", local.shell(test[1])] if test[0] == "CMD-SHELL" else local.argv(test[1:])
    timeout = float(str(service["healthcheck"]["timeout"]).rstrip("s"))
    try:
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def _started(name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()


def _status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_every_service_starts_and_becomes_healthy(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    python_services = [n for n, s in services.items() if _ours(s)]
    for name in python_services:
        argv = _command(services[name])
        if argv[:2] == ["python", "-m"] and importlib.util.find_spec(argv[2]) is None:
            pytest.fail(f"service {name} runs `python -m {argv[2]}`, which does not exist yet")
    redis_server = shutil.which("redis-server")
    if redis_server is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed here")

    redis_port = _free_port()
    published = {int(m.group(1)) for s in services.values() for m in
                 re.finditer(r"--port[ =](\d+)", " ".join(_command(s)))}
    local = Local(tmp_path, redis_port, {port: _free_port() for port in published})
    (tmp_path / "var-lib-cohort").mkdir()
    config_path = tmp_path / "cohort.toml"
    config_path.write_text(local.text(compose["configs"]["cohort_config"]["content"]))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("COHORT_")}
    logdir = tmp_path / "logs"
    logdir.mkdir()

    def env_of(name: str) -> dict[str, str]:
        env = {**base_env, **{k: local.text(v) for k, v in services_env(services[name]).items()}}
        if "COHORT_CONFIG" in env:
            env["COHORT_CONFIG"] = str(config_path)
        return env

    # Redis as compose runs it (append-only, password), on a free port, its data in tmp_path.
    redis_argv = _command(services["redis"])
    assert redis_argv[:2] == ["sh", "-c"]
    redis_script = redis_argv[2].replace("redis-server", f"{redis_server} --port {redis_port} --bind 127.0.0.1 "
                                                         f"--dir {tmp_path} --daemonize no", 1)
    redis_env = {**base_env, **services_env(services["redis"])}
    with contextlib.ExitStack() as stack:
        processes = {"redis": stack.enter_context(_started("redis", ["sh", "-c", redis_script], redis_env, logdir))}
        deadline = time.monotonic() + 10
        while not _healthy(local, services["redis"], redis_env):
            assert processes["redis"].poll() is None, (logdir / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis never became healthy"
            time.sleep(0.2)
        for name in python_services:
            processes[name] = stack.enter_context(_started(name, local.argv(_command(services[name])), env_of(name),
                                                           logdir))
        waiting = set(python_services)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while waiting:
            for name in sorted(waiting):
                if processes[name].poll() is not None:
                    pytest.fail(f"{name} exited with {processes[name].returncode}:\n"
                                f"{(logdir / f'{name}.log').read_text(errors='replace')[-3000:]}")
                if _healthy(local, services[name], env_of(name)):
                    waiting.discard(name)
            if waiting and time.monotonic() > deadline:
                logs = "\n".join(f"--- {n} ---\n{(logdir / f'{n}.log').read_text(errors='replace')[-2000:]}"
                                 for n in sorted(waiting))
                pytest.fail(f"not healthy after {HEALTH_TIMEOUT_S} s: {sorted(waiting)}\n{logs}")
            time.sleep(0.5)
        assert (tmp_path / "appendonly.aof").exists() or (tmp_path / "appendonlydir").is_dir()
        # Authentication is on where compose says it is.
        flower = f"http://127.0.0.1:{local.ports[5555]}"
        assert _status(f"{flower}/api/workers") == 401
        assert _status(f"{flower}/api/workers", TEST_ENV["FLOWER_BASIC_AUTH"]) == 200
        monitor = f"http://127.0.0.1:{local.ports[9808]}"
        assert _status(f"{monitor}/metrics") == 401
        assert _status(f"{monitor}/metrics", "cohort:" + TEST_ENV["COHORT_MONITOR_PASSWORD"]) == 200
        api = f"http://127.0.0.1:{local.ports[8000]}"
        assert _status(f"{api}/readyz") == 200
