"""The cluster path end to end, nothing mocked: a real Ray head (`ray start --head`) and a real MLflow
server (sqlite backend), both on loopback, jobs submitted with `ray job submit`, results read back
through MLflow's REST API, both servers stopped by process group.

Jobs: a tiny sweep (two trials of configs/sweeps/smoke_eta.yaml) -> SUCCEEDED; then train, defend
and report jobs on what the sweep left (all reuse it); a job with a bad config and one that fails
after opening its MLflow run -> FAILED, with the error in the job logs and no RUNNING run anywhere.
Independent jobs run side by side to keep the wall time down (minutes on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray and mlflow CLIs sit beside its python
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# -- processes and ports ---------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together, so the n ports differ
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; starttime is index 19."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` with its start time (Ray puts workers and job drivers in process
    groups of their own, so killing the server's group alone can leave them behind)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(_stat(int(stat.parent.name))[1]), []).append(int(stat.parent.name))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            with contextlib.suppress(OSError, IndexError):
                if child not in out:
                    out[child] = _stat(child)[19]
                    todo.append(child)
    return out


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


def _stop(servers: list[Server], grace: float = 20) -> None:
    """SIGTERM to each server's process group, then SIGKILL to what is left of the groups and of the
    processes below them (only processes these servers started)."""
    below = {pid: start for server in servers for pid, start in _descendants(server.proc.pid).items()}
    for server in servers:
        server.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for server in servers:
        server.signal_group(signal.SIGKILL)
        server.proc.wait(timeout=30)
    for pid, start in below.items():
        with contextlib.suppress(OSError, IndexError):
            if _stat(pid)[19] == start:  # still that process, not a reused pid
                os.kill(pid, signal.SIGKILL)


def _start(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> Server:
    log = logs / f"{name}.log"
    with open(log, "w") as f:  # each server leads its own process group: stopped as one
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=logs)
    return Server(name, proc, log)


def _http(url: str, *, data: dict | None = None, token: str | None = None, host: str | None = None,
          timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _wait_until(what: str, ready, server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise AssertionError(f"{server.name} exited with {server.proc.returncode}:\n{server.tail()}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {timeout:.0f}s:\n{server.tail()}")


# -- the cluster -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    dashboard: str
    mlflow: str
    token: str
    env: dict[str, str]
    storage: Path
    artifacts: Path
    ports: dict[str, int]
    servers: list[Server]

    def submit(self, entrypoint: list[str], submission_id: str) -> subprocess.Popen:
        """`ray job submit --no-wait` of ``entrypoint`` with the repository as working dir."""
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": self.mlflow, "BDRAY_STORAGE": str(self.storage)}}
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
               "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *entrypoint]
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def job(self, submission_id: str) -> dict:
        status, body = _http(f"{self.dashboard}/api/jobs/{submission_id}", token=self.token)
        assert status == 200, body
        return json.loads(body)

    def wait(self, submission_ids: list[str], timeout: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = {i: self.job(i) for i in submission_ids}
            if all(j["status"] in TERMINAL for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not finished after {timeout:.0f}s: "
                                     f"{ {i: j['status'] for i, j in jobs.items()} }")
            time.sleep(3)

    def logs(self, submission_id: str, *, cli: bool = False) -> str:
        """Through the job API (what `ray job logs` reads), or the CLI itself (seconds of startup each)."""
        if cli:
            out = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", self.dashboard, submission_id],
                                 env=self.env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout
        status, body = _http(f"{self.dashboard}/api/jobs/{submission_id}/logs", token=self.token)
        assert status == 200, body
        return json.loads(body)["logs"]

    def mlflow_api(self, path: str, data: dict | None = None) -> dict:
        status, body = _http(f"{self.mlflow}/api/2.0/mlflow/{path}", data=data)
        assert status == 200, f"{path}: {status} {body[:500]}"
        return json.loads(body)


@contextlib.contextmanager
def _cluster() -> Iterator[Cluster]:
    # Short paths: Ray's unix sockets live under its temp dir and have a length limit.
    tmp = Path(tempfile.mkdtemp(prefix="bdray-e2e-", dir="/tmp"))
    names = ["gcs", "dashboard", "client", "agent_http", "agent_grpc", "metrics", "runtime_env", "node_manager",
             "object_manager", "mlflow"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           # Token auth as on a cluster; the token only ever lives in these processes' environment.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    logs = tmp / "logs"
    logs.mkdir()
    servers: list[Server] = []
    try:
        servers.append(_start("ray", [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
            "--node-ip-address=127.0.0.1", f"--temp-dir={tmp / 'ray'}",
            f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['runtime_env']}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        ], env, logs))
        servers.append(_start("mlflow", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", (tmp / "artifacts").as_uri(),
            "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
            "--allowed-hosts", f"127.0.0.1:{ports['mlflow']},localhost:{ports['mlflow']}",
        ], {**env, "MLFLOW_LOGGING_LEVEL": "WARNING"}, logs))
        ray_server, mlflow_server = servers
        cluster = Cluster(dashboard=f"http://127.0.0.1:{ports['dashboard']}",
                          mlflow=f"http://127.0.0.1:{ports['mlflow']}", token=token, env=env,
                          storage=tmp / "storage", artifacts=tmp / "artifacts", ports=ports, servers=servers)
        _wait_until("mlflow server", lambda: _http(f"{cluster.mlflow}/health")[0] == 200, mlflow_server, 180)
        _wait_until("ray job API", lambda: _http(f"{cluster.dashboard}/api/version", token=token)[0] == 200,
                    ray_server, 240)
        yield cluster
    finally:
        _stop(servers)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the test --------------------------------------------------------------------------------------


def _runs(cluster: Cluster, experiment_ids: list[str], filter_string: str = "") -> list[dict]:
    return cluster.mlflow_api("runs/search", {"experiment_ids": experiment_ids, "filter": filter_string,
                                              "max_results": 1000}).get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _json_line(logs: str) -> dict:
    return json.loads(next(line for line in reversed(logs.splitlines()) if line.startswith("{")))


def test_jobs_on_a_real_ray_head_with_a_real_mlflow_server() -> None:
    t0 = time.monotonic()
    uid = secrets.token_hex(3)

    def phase(name: str) -> None:
        print(f"[{time.monotonic() - t0:5.0f}s] {name}", flush=True)

    with _cluster() as cluster:
        phase("ray head and mlflow server up")
        ports = cluster.ports
        # Security defaults of the local head: dashboard/job API on loopback only, and token auth on it.
        assert _http(f"{cluster.dashboard}/api/jobs/")[0] == 401
        assert _http(f"{cluster.mlflow}/api/2.0/mlflow/experiments/search", data={"max_results": 1},
                     host="evil.example:80")[0] == 403  # --allowed-hosts
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{ports['dashboard']}"], capture_output=True, text=True)
        if listening.returncode == 0:
            assert listening.stdout.strip() and all(" 127.0.0.1:" in line for line in listening.stdout.splitlines())

        # 1. The sweep, a job whose config is invalid and one that fails after opening its MLflow run, together.
        sweep_id, bad_id, broken_id = f"sweep-{uid}", f"badconfig-{uid}", f"broken-{uid}"
        missing = "no/such/suspect.safetensors"
        submits = [
            cluster.submit(["python", "jobs/sweep.py", "--config", "configs/sweeps/smoke_eta.yaml"], sweep_id),
            cluster.submit(["python", "jobs/defend.py", "--config", "configs/smoke.yaml",
                            "--set", "attack.poison_rate=1.5"], bad_id),
            cluster.submit(["python", "jobs/defend.py", "--config", "configs/smoke.yaml",
                            "--set", f"model.checkpoint={missing}"], broken_id),
        ]
        for proc in submits:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        phase("sweep, bad-config and broken jobs submitted")
        jobs = cluster.wait([sweep_id, bad_id, broken_id], timeout=900)
        phase("they finished")
        assert jobs[sweep_id]["status"] == "SUCCEEDED", cluster.logs(sweep_id)[-4000:]

        bad_logs = cluster.logs(bad_id, cli=True)
        assert jobs[bad_id]["status"] == "FAILED"
        assert "error: configs/smoke.yaml: attack.poison_rate: Input should be less than 1 (got 1.5)" in bad_logs
        assert "Traceback" not in bad_logs  # the one-line error, not a stack
        assert jobs[broken_id]["status"] == "FAILED"
        assert missing in cluster.logs(broken_id)

        # 2. The sweep's runs, read back through MLflow's REST API.
        exp = cluster.mlflow_api("experiments/get-by-name?experiment_name=smoke-eta")["experiment"]
        assert exp["artifact_location"].startswith("mlflow-artifacts:")  # the server's store, not the job's disk
        runs = _runs(cluster, [exp["experiment_id"]])
        parent = [r for r in runs if "bdray.sweep_key" in _tags(r)]
        trials = [r for r in runs if _tags(r).get("bdray.trial") == "1"]
        assert len(parent) == 1 and parent[0]["info"]["status"] == "FINISHED"
        assert len(trials) == 2
        etas = set()
        for trial in trials:
            assert trial["info"]["status"] == "FINISHED"
            assert _tags(trial)["mlflow.parentRunId"] == parent[0]["info"]["run_id"]
            metrics = {m["key"]: m["value"] for m in trial["data"]["metrics"]}
            assert 0.5 < metrics["auroc"] <= 1.0 and 0.0 <= metrics["defended_asr"] <= 1.0
            etas.add(float({p["key"]: p["value"] for p in trial["data"]["params"]}["defense.eta"]))
            files = cluster.mlflow_api(f"artifacts/list?run_id={trial['info']['run_id']}").get("files", [])
            assert {"config.yaml", "plots", "detector"} <= {f["path"] for f in files}
        assert etas == {5.0e-4, 2.0e-3}
        stage_runs = [r for r in runs if _tags(r).get("stage") in ("train", "expert", "auxiliary")]
        assert stage_runs and all(r["info"]["status"] == "FINISHED" for r in stage_runs)
        assert any(cluster.artifacts.rglob("config.yaml"))  # proxied into the server's --artifacts-destination

        # 3. Train, defend and report jobs on what the sweep left: all three reuse it.
        train_id, defend_id, report_id = f"train-{uid}", f"defend-{uid}", f"report-{uid}"
        submits = [
            cluster.submit(["python", "jobs/train.py", "--config", "configs/smoke.yaml"], train_id),
            cluster.submit(["python", "jobs/defend.py", "--config", "configs/smoke.yaml",
                            "--set", "defense.eta=5.0e-4"], defend_id),
            cluster.submit(["python", "jobs/report.py", "--config", "configs/sweeps/smoke_eta.yaml"], report_id),
        ]
        for proc in submits:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        phase("train, defend and report jobs submitted")
        jobs = cluster.wait([train_id, defend_id, report_id], timeout=600)
        phase("they finished")
        train_logs, defend_logs, report_logs = (cluster.logs(i) for i in (train_id, defend_id, report_id))
        assert jobs[train_id]["status"] == "SUCCEEDED", train_logs[-4000:]
        assert jobs[defend_id]["status"] == "SUCCEEDED", defend_logs[-4000:]
        assert jobs[report_id]["status"] == "SUCCEEDED", report_logs[-4000:]
        assert "M + BaDExpert (held-out threshold)" in defend_logs
        defended = _json_line(defend_logs)
        assert defended["tracking_uri"] == cluster.mlflow and defended["experiment"] == "smoke"
        trained = _json_line(train_logs)
        ledger = json.loads(next((cluster.storage / "sweeps").rglob("trials/*.json")).read_text())
        # The train job computes the same stage keys as the experiment: it found the sweep's artifacts.
        assert trained["cached"] and trained["poison_cached"]
        keys = ledger["stage_keys"]
        assert (trained["poison_key"], trained["key"]) == (keys["poison"], keys["train"])
        assert "| defense.eta |" in report_logs
        files = cluster.mlflow_api(f"artifacts/list?run_id={parent[0]['info']['run_id']}&path=report")["files"]
        assert "report/report.md" in {f["path"] for f in files}

        # 4. The failures left nothing RUNNING; the run the broken job opened was ended FAILED.
        every = [e["experiment_id"] for e in cluster.mlflow_api("experiments/search", {"max_results": 1000})
                 ["experiments"]]
        assert _runs(cluster, every, "attributes.status = 'RUNNING'") == []
        smoke = cluster.mlflow_api("experiments/get-by-name?experiment_name=smoke")["experiment"]["experiment_id"]
        experiments = {r["info"]["run_id"]: r["info"]["status"] for r in _runs(cluster, [smoke], "")
                       if "bdray.workflow" not in _tags(r) and "stage" not in _tags(r)}  # not train's, not stages
        assert experiments.pop(defended["mlflow_run_id"]) == "FINISHED"
        assert list(experiments.values()) == ["FAILED"]  # the broken job's
        phase("checked; stopping both servers")

    # 5. Both servers are gone: nothing listens on their ports any more.
    assert not any(_port_open(ports[name]) for name in ("gcs", "dashboard", "client", "mlflow"))
    phase("both stopped, ports closed")
