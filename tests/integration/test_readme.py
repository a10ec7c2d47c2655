"""The README's walk-through, run verbatim against a fresh `medmaas standalone`.

The blocks marked `<!-- walkthrough -->` in README.md ("Using the API", "Web pages and the
command-line client") are pasted, in order, into one `bash -euo pipefail` session whose
working directory is where the server was started, so `.medmaas/api_key` is the server's
own key file, with `examples/` and `.venv` beside it as in a checkout. The only text
changed is the server address (http://127.0.0.1:5000 becomes the test's free port). HOME
is a temporary directory (so `medmaas login` writes there) and PATH has no `medmaas` on
it until the README's own `source .venv/bin/activate`. The server already holds a dataset
and jobs, as after the quick start's demo, so an id hard-coded in the README would point at
the wrong object. After each block the test checks what that block should have achieved, through
the API and the files the block wrote.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from medmaas.standalone import free_port
from tests.conftest import wait_until
from tests.integration.test_standalone import START_TIMEOUT_S, Standalone

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_URL = "http://127.0.0.1:5000"
BLOCK_TIMEOUT_S = 300  # one block on a loaded 2-core CI box; a normal run takes well under a minute
WALKTHROUGH_SECTIONS = ("## Using the API", "## Web pages and the command-line client")
MARKER = "<!-- walkthrough -->"
_BLOCK = re.compile(r"^<!-- walkthrough -->[ \t]*\n```bash[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_DECLARE = re.compile(r'^declare -[-\w]* (\w+)="(.*)"$')


def walkthrough_blocks(text: str) -> list[str]:
    """The ```bash blocks right after a walkthrough marker, in README order; every marker
    must lie in one of the walk-through sections and be followed by a bash block."""
    sections = [(m.start(), m.group(0).strip()) for m in re.finditer(r"^## .*$", text, re.M)]
    blocks = []
    for m in _BLOCK.finditer(text):
        section = [title for start, title in sections if start < m.start()][-1]
        assert section in WALKTHROUGH_SECTIONS, f"walkthrough block under {section!r}"
        blocks.append(m.group(1))
    assert len(blocks) == text.count(MARKER), "a walkthrough marker not followed by a ```bash block"
    return blocks


def test_readme_marks_its_walkthrough() -> None:
    """Cheap check that runs without services: the blocks are there and use the example files."""
    text = README.read_text()
    blocks = walkthrough_blocks(text)
    assert len(blocks) >= 3
    joined = "\n".join(blocks)
    for name in ("solubility.csv", "library.smi", "digits.npz"):
        assert f"examples/{name}" in joined and (ROOT / "examples" / name).is_file(), name
    assert README_URL in joined
    # no hard-coded object ids: every id comes from an earlier command's output
    assert not re.search(r"/(jobs|datasets)/\d", joined), "a hard-coded id in the walk-through"
    assert not re.search(r"medmaas (jobs watch|download|score \S+) \d", joined)


class Shell:
    """One `bash -euo pipefail` fed one block at a time; output goes to a log file."""

    def __init__(self, cwd: Path, env: dict[str, str], scratch: Path):
        self.scratch = scratch
        self.log_path = scratch / "shell.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc", "-euo", "pipefail"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.n = 0

    def run(self, block: str, timeout: float) -> tuple[str, dict[str, str]]:
        """Run a block (stdin from /dev/null, so nothing in it can read the next one);
        returns its output and the shell's simple variables afterwards."""
        self.n += 1
        script = self.scratch / f"block{self.n}.sh"
        script.write_text(block)
        done = self.scratch / f"vars{self.n}"
        start = self.log_path.stat().st_size
        self.proc.stdin.write(f"source {script} </dev/null\ndeclare -p > {done}.tmp; mv {done}.tmp {done}\n".encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while not done.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"walk-through block {self.n} failed (bash exited {self.proc.returncode}):\n"
                            f"{block}\n--- output ---\n{self.output(start)}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"walk-through block {self.n} still running after {timeout}s:\n{block}\n"
                            f"--- output ---\n{self.output(start)}")
            time.sleep(0.2)
        variables = {}
        for line in done.read_text().splitlines():
            if m := _DECLARE.match(line):
                variables[m.group(1)] = m.group(2)
        return self.output(start), variables

    def output(self, start: int = 0) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as fh:
            fh.seek(start)
            return fh.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the bash session this test started
                self.proc.wait(10)
        self._log.close()


def _venv_for(work: Path) -> None:
    """`.venv` beside the examples, as in a checkout: the environment running the tests."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").exists():
        (work / ".venv").symlink_to(sys.prefix)
        return
    exe = shutil.which("medmaas", path=str(Path(sys.executable).parent)) or shutil.which("medmaas")
    assert exe, "no medmaas executable to put in .venv/bin"
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{Path(exe).parent}:$PATH"\nhash -r\n')


def _shell_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDMAAS_", "XDG_CONFIG", "VIRTUAL_ENV", "BASH_FUNC_"))}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "medmaas").exists()]
    env.update(HOME=str(home), PATH=os.pathsep.join(path), COLUMNS="120", TERM="dumb", LC_ALL="C.UTF-8")
    return env


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.mark.timeout(900)
def test_readme_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    blocks = walkthrough_blocks(README.read_text())
    work, home, scratch = tmp_path / "work", tmp_path / "home", tmp_path / "shell"
    for d in (work, home, scratch):
        d.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    _venv_for(work)

    port = free_port()
    sa = Standalone(work, port, tmp_path / "standalone.log")
    shell = None
    try:
        sa.wait_for_line(r"API key for tenant 'default'", START_TIMEOUT_S)
        base = sa.started()
        key = (work / ".medmaas" / "api_key").read_text().strip()
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {key}"

        def get(path: str) -> dict:
            r = api.get(f"{base}/api/v1{path}", timeout=30)
            assert r.status_code == 200, (path, r.status_code, r.text)
            return r.json()

        # as after the quick start's `standalone --demo`, the low ids are taken (the demo
        # itself trains for minutes on a 2-core box; its objects are what matters here)
        with open(ROOT / "examples" / "solubility.csv", "rb") as fh:
            r = api.post(f"{base}/api/v1/datasets", files={"file": fh}, timeout=60,
                         data={"kind": "sequences", "name": "taken", "label_columns": "solubility"})
        assert r.status_code == 201, r.text
        taken = {"dataset": r.json()["id"], "jobs": []}
        for _ in range(2):
            r = api.post(f"{base}/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 1, "steps": 1}}, timeout=30)
            assert r.status_code == 202, r.text
            taken["jobs"].append(r.json()["id"])

        env = _shell_env(home)
        assert shutil.which("medmaas", path=env["PATH"]) is None  # only the README's `source .venv/bin/activate`
        shell = Shell(work, env, scratch)

        def run(block: str) -> tuple[str, dict[str, str]]:
            out, variables = shell.run(block.replace(README_URL, base), BLOCK_TIMEOUT_S)
            return out, variables

        # -- block 1: jobs: submit, idempotency, poll, events, stream, cancel, list --------
        out, v = run(blocks[0])
        context = f"--- block 1 output ---\n{out}"
        assert v["JOB"] == v["AGAIN"], context
        assert int(v["JOB"]) > max(taken["jobs"]), context
        assert get(f"/jobs/{v['JOB']}")["state"] == "succeeded", context
        assert "event: end" in out and '"state": "succeeded"' in out, context
        wait_until(lambda: get(f"/jobs/{v['LONG']}")["state"] == "cancelled", 30, 0.5,
                   what=f"job {v['LONG']} to be cancelled\n{context}")
        listed = [d for d in _json_lines(out) if "items" in d]
        assert listed and {j["kind"] for j in listed[-1]["items"]} == {"sleep"}, context

        # -- block 2: upload sequences, train with a scaffold split, registry, predict ----
        out, v = run(blocks[1])
        context = f"--- block 2 output ---\n{out}\n--- server ---\n{sa.output()}"
        ds = get(f"/datasets/{v['DS']}")
        assert ds["kind"] == "sequences" and ds["rows"] > 400 and ds["rows"] + ds["invalid_rows"] == 500, context
        assert ds["id"] != taken["dataset"], context
        train = get(f"/jobs/{v['TRAIN']}")
        assert train["state"] == "succeeded", context
        assert train["result"]["data"]["split"] == "scaffold", context
        epochs = train["spec"]["epochs"]
        assert train["result"]["epochs_trained"] == epochs, context
        assert out.count("event: metric") == epochs and "event: end" in out, context
        assert v["VERSION"] == str(train["result"]["version"]), context
        assert get("/models/sol")["aliases"].get("production") == int(v["VERSION"]), context
        weights = (work / "sol.safetensors").read_bytes()
        header_len = struct.unpack("<Q", weights[:8])[0]
        assert weights[8:9] == b"{" and 8 + header_len < len(weights), context
        preds = [d for d in _json_lines(out) if "predictions" in d]
        assert preds, f"predict did not answer with predictions (a 202 means it was slower than its timeout)\n{context}"
        assert len(preds) == 2, context
        items = preds[0]["predictions"]
        assert len(items) == 3 and all("value" in p for p in items[:2]) and "error" in items[2], context
        explained = preds[1]["predictions"][0]  # why, how sure, like the training data?
        lo, hi = explained["interval"]["values"]["solubility"]
        assert lo < explained["value"] < hi and explained["interval"]["coverage"] == 0.9, context
        assert 0 < explained["domain"]["nn_similarity"] <= 1 and "in_domain" in explained["domain"], context
        drawing = explained["explanation"]
        assert drawing["svg"].startswith("<svg") and len(drawing["atom_weights"]) == 7, context

        # -- block 3: the CLI: login, image dataset, CNN training, predict, score, download
        out, v = run(blocks[2])
        context = f"--- block 3 output ---\n{out}\n--- server ---\n{sa.output()}"
        assert (home / ".config" / "medmaas" / "config.json").exists(), context
        img = get(f"/datasets/{v['IMG']}")
        assert img["kind"] == "images" and img["rows"] == 1797, context
        cnn = get("/jobs?kind=train&limit=1")["items"][0]
        assert cnn["spec"]["model_name"] == "digits" and cnn["state"] == "succeeded", context
        assert re.search(r"Job \d+ succeeded", out) and "Model digits version 1 registered" in out, context
        assert '"predictions"' in out and out.count('"value"') >= 2, context  # `medmaas predict` pretty-prints
        drawn = sorted(p.name for p in (work / "drawings").iterdir())
        assert drawn == ["1.svg", "2.svg"], context
        assert all((work / "drawings" / n).read_text().startswith("<svg") for n in drawn), context
        lib = get(f"/datasets/{v['LIB']}")
        assert lib["kind"] == "library" and lib["rows"] == 1504, context
        score = get(f"/jobs/{v['SCORE']}")
        assert score["kind"] == "score" and score["state"] == "succeeded", context
        assert score["spec"]["library_id"] == int(v["LIB"]), context
        with open(work / "scores.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0][:3] == ["row", "id", "smiles"] and "valid" in rows[0] and "error" in rows[0], rows[0]
        assert len(rows) == 1 + 1504, context
        valid = rows[0].index("valid")
        assert sum(r[valid] == "false" for r in rows[1:]) == 4, context
        assert "moses-0000000" in out and "invalid-unclosed-ring" in out, context  # head and grep printed
        assert (work / "scores-http.csv").read_bytes() == (work / "scores.csv").read_bytes(), context
        parquet = (work / "scores.parquet").read_bytes()
        assert parquet[:4] == b"PAR1" and parquet[-4:] == b"PAR1", context
        import pyarrow.parquet as pq
        assert pq.read_table(work / "scores.parquet").num_rows == 1504, context
    finally:
        if shell is not None:
            shell.stop()
        sa.kill_everything()
