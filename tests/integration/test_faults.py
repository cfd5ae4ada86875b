"""Faults a user meets, through the CLI against real Prefect, Ray and MLflow: a disk that fills,
a tracking store that cannot be written, a read-only or unwritable workdir, a driver killed
with SIGKILL. Each ends in one line naming the path (exit 1), the run is marked failed where
summary.json can be written, and the next run recovers; a killed driver's Prefect server and
Ray are stopped by the next command.

The full disk is a small tmpfs and the read-only workdir a read-only bind mount, both in a
private mount namespace (`unshare -m` as root, `unshare -Urm` as another user where the kernel
allows unprivileged user namespaces), so nothing stays mounted whatever happens to the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

SPEC = "tests/integration/data-tiny.yaml"
VLMFLOW = [sys.executable, "-m", "vlmflow.cli"]
ERROR_LINE = re.compile(r"^vlmflow: error: (?P<path>/\S+): (?P<reason>[^(]+) \((?P<hint>.+)\)$")


def _env() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _namespace(probe_dir: Path) -> list[str] | None:
    """The command prefix of a shell in a private mount namespace where it may mount; None where
    this machine allows none (no root, no unprivileged user namespaces)."""
    prefixes = [["unshare", "-m"]] if os.geteuid() == 0 else []
    prefixes.append(["unshare", "-Urm"])
    for prefix in prefixes:
        try:
            probe = subprocess.run(
                [*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(probe_dir)],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def _script_steps(out: Path) -> str:
    """A bash prelude: `step NAME ARGS...` runs `vlmflow ARGS...`, its stdout, stderr and exit
    code in OUT/NAME.{out,err,rc} (outside every mount)."""
    command = " ".join(f"'{part}'" for part in VLMFLOW)
    return (
        "set -u\n"
        f'step() {{ name=$1; shift; {command} "$@" > "{out}/$name.out" 2> "{out}/$name.err"; '
        f'echo $? > "{out}/$name.rc"; }}\n'
    )


class Steps:
    """What the namespaced script's steps left in OUT."""

    def __init__(self, out: Path):
        self.out = out

    def rc(self, name: str) -> int:
        return int((self.out / f"{name}.rc").read_text())

    def err(self, name: str) -> str:
        return (self.out / f"{name}.err").read_text()

    def stdout(self, name: str) -> str:
        return (self.out / f"{name}.out").read_text()

    def error_line(self, name: str) -> re.Match:
        """The step's last stderr line, which must be the one-line error; no traceback anywhere."""
        err = self.err(name)
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        found = ERROR_LINE.match(last)
        assert found, err[-3000:]
        return found


def _run_id(match: re.Match) -> str:
    found = re.search(r"run (\S+) failed", match["hint"])
    assert found, match.group(0)
    return found[1]


def _summary(workdir: Path, run_id: str) -> dict:
    return json.loads((workdir / "runs" / run_id / "summary.json").read_text())


def _mlflow_status(workdir: Path, mlflow_run_id: str) -> str:
    with sqlite3.connect(workdir / "mlflow.db") as db:
        return db.execute("SELECT status FROM runs WHERE run_uuid = ?", (mlflow_run_id,)).fetchone()[0]


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> tuple[Steps, Path]:
    """One script in a private mount namespace, each phase a CLI call on one workdir W:
    full: W/artifacts is a 256 KiB tmpfs, the run's first stage fills it; again: the tmpfs grown
    to 64 MiB, the same run; verify. no_mlflow: W/mlartifacts a full tmpfs (MLflow cannot log);
    mlflow_back: unmounted, the same run. ro_*: W bind-mounted read-only: the finished run again,
    one that must compute, and a new workdir inside; writable: unmounted, the run again."""
    root = tmp_path_factory.mktemp("faults")
    prefix = _namespace(root)
    if prefix is None:
        pytest.skip("no mount namespace here (not root, and unprivileged user namespaces are off)")
    workdir, out = root / "w", root / "out"
    (workdir / "artifacts").mkdir(parents=True)
    (workdir / "mlartifacts").mkdir()
    out.mkdir()
    script = _script_steps(out) + "\n".join(
        [
            f"mount -t tmpfs -o size=256k tmpfs {workdir}/artifacts",
            f"step full run {SPEC} --workdir {workdir}",
            f"step full_status status --workdir {workdir}",
            f"mount -o remount,size=64m {workdir}/artifacts",
            f"step again run {SPEC} --workdir {workdir}",
            f"step verify verify --workdir {workdir}",
            f"mount -t tmpfs -o size=64k tmpfs {workdir}/mlartifacts",
            f"dd if=/dev/zero of={workdir}/mlartifacts/filler bs=4k 2>/dev/null",
            f"step no_mlflow run {SPEC} --workdir {workdir}",
            f"umount {workdir}/mlartifacts",
            f"step mlflow_back run {SPEC} --workdir {workdir}",
            f"mount --bind {workdir} {workdir} && mount -o remount,bind,ro {workdir}",
            f"step ro_cached run {SPEC} --workdir {workdir}",
            f"step ro_compute run {SPEC} --workdir {workdir} --set seed=18",
            f"step ro_new run {SPEC} --workdir {workdir}/new",
            f"step ro_status status --workdir {workdir}",
            f"umount {workdir}",
            f"step writable run {SPEC} --workdir {workdir}",
            f"cp -r {workdir}/artifacts {root}/artifacts-copy",  # what the tmpfs held, for the asserts
        ]
    )
    subprocess.run([*prefix, "bash", "-c", script], cwd=REPO, env=_env(), timeout=900, check=True)
    return Steps(out), workdir


def test_a_full_disk_ends_the_run_in_one_line_naming_the_file_and_marks_it_failed(faults):
    steps, workdir = faults
    assert steps.rc("full") == 1, steps.err("full")[-3000:]
    line = steps.error_line("full")
    assert line["path"].startswith(f"{workdir}/artifacts/ingest/"), line.group(0)
    assert line["reason"] == "no space left on the device"
    assert "free space there and run again" in line["hint"]
    summary = _summary(workdir, _run_id(line))
    assert summary["status"] == "failed" and "no space left on the device" in summary["error"]
    assert {s["name"]: s["status"] for s in summary["stages"]} == {
        "ingest": "failed",
        "dedup": "skipped",
        "tokenizer": "skipped",
    }
    assert _mlflow_status(workdir, summary["mlflow_run_id"]) == "FAILED"
    assert f"{summary['run_id']}  data-tiny       failed" in steps.stdout("full_status")


def test_the_next_run_on_a_disk_with_room_recovers_from_the_partial_build(faults):
    steps, workdir = faults
    assert steps.rc("again") == 0, steps.err("again")[-3000:]
    assert "): succeeded" in steps.stdout("again")
    assert steps.rc("verify") == 0, steps.stdout("verify")
    assert steps.stdout("verify").count(" ok (") == 3
    store = workdir.parent / "artifacts-copy"
    again = _summary(workdir, re.search(r"^run (\S+) ", steps.stdout("again"), re.M)[1])
    for stage in again["stages"]:  # each committed with its manifest; its build folder gone
        assert stage["status"] == "computed"
        assert (store / stage["name"] / stage["artifact_digest"] / "_SUCCESS").is_file()
        assert not (store / stage["name"] / f"{stage['artifact_digest']}.partial").exists()


def test_a_run_whose_mlflow_logging_fails_never_says_succeeded(faults):
    steps, workdir = faults
    assert steps.rc("no_mlflow") == 1, steps.err("no_mlflow")[-3000:]
    line = steps.error_line("no_mlflow")
    assert line["reason"] == "no space left on the device" and line["path"].startswith(str(workdir))
    summary = _summary(workdir, _run_id(line))
    assert summary["status"] == "failed" and "no space left" in summary["error"]
    assert _mlflow_status(workdir, summary["mlflow_run_id"]) == "FAILED"
    assert steps.rc("mlflow_back") == 0 and "): succeeded" in steps.stdout("mlflow_back")


def test_a_read_only_workdir_ends_at_once_in_one_line_and_the_next_run_recovers(faults):
    steps, workdir = faults
    for name in ("ro_cached", "ro_compute"):  # nothing starts: no Prefect server to time out
        assert steps.rc(name) == 1, steps.err(name)[-3000:]
        line = steps.error_line(name)
        assert (line["path"], line["reason"]) == (str(workdir), "read-only file system")
        assert "give a writable --workdir" in line["hint"] and len(steps.err(name).strip().splitlines()) == 1
    line = steps.error_line("ro_new")
    assert steps.rc("ro_new") == 1 and (line["path"], line["reason"]) == (f"{workdir}/new", "read-only file system")
    listed = steps.stdout("ro_status").splitlines()
    assert steps.rc("ro_status") == 0 and len(listed) == 4  # reading a read-only workdir still works
    assert steps.rc("writable") == 0 and "): succeeded" in steps.stdout("writable")


def test_an_unwritable_workdir_is_one_line_for_a_user_without_write_permission(tmp_path):
    """EACCES: a workdir this user cannot write (as root: run as nobody, where setpriv exists)."""
    workdir = tmp_path / "w"
    command = [*VLMFLOW, "run", SPEC, "--workdir", str(workdir / "inner")]
    if os.geteuid() == 0:
        if not Path("/usr/bin/setpriv").exists():
            pytest.skip("root writes through any mode, and setpriv (to run as nobody) is missing")
        workdir = Path(tempfile.mkdtemp(prefix="vlmflow-unwritable-")) / "w"  # pytest's tmp is root's only
        workdir.parent.chmod(0o755)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command[:-1], str(workdir / "inner")]
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        if workdir.parent != tmp_path:
            shutil.rmtree(workdir.parent)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"vlmflow: error: {workdir}/inner: permission denied (give a --workdir this user can write)"
    )


def _session(pid: int) -> list[psutil.Process]:
    """The processes left in session `pid` (the driver's own: start_new_session)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def test_a_sigkilled_driver_leaves_nothing_once_the_next_command_runs(tmp_path):
    workdir = tmp_path / "w"
    log = tmp_path / "driver.err"
    with open(log, "w") as err:
        driver = subprocess.Popen(
            [*VLMFLOW, "run", SPEC, "--workdir", str(workdir)],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    decoy = subprocess.Popen(["sleep", "120"])  # a process the dead run did not start: never touched
    try:
        deadline = time.monotonic() + 240
        record = None
        while time.monotonic() < deadline and driver.poll() is None:
            found = [p for p in workdir.glob("runs/*/processes.json") if p.parent.name != "latest"]
            roles = {p["role"] for p in json.loads(found[0].read_text())["processes"]} if found else set()
            if roles >= {"prefect-server", "ray"}:
                record = found[0]
                break
            time.sleep(0.5)
        assert record is not None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        left = _session(driver.pid)
        commands = " ".join(" ".join(p.cmdline()) for p in left)
        assert "prefect.server" in commands and "ray::" in commands  # what a killed driver leaves
        data = json.loads(record.read_text())
        # the decoy's pid with another start time: a pid reused since the run recorded it
        data["processes"].append(
            {"pid": decoy.pid, "create_time": psutil.Process(decoy.pid).create_time() - 50, "cmdline": ["sleep", "120"],
             "role": "ray"}
        )  # fmt: skip
        record.write_text(json.dumps(data))

        status = subprocess.run(
            [*VLMFLOW, "status", "--workdir", str(workdir)], cwd=REPO, env=_env(), capture_output=True, text=True
        )
        assert status.returncode == 0, status.stderr
        assert re.search(rf"^{record.parent.name}\s+data-tiny\s+dead", status.stdout, re.M), status.stdout
        assert _session(driver.pid) == [], [p.cmdline() for p in _session(driver.pid)]
        assert "its driver died; stopped the" in status.stderr
        assert decoy.poll() is None, "the reaper killed a process the run did not start"
        assert not record.exists() and (record.parent / "processes.reaped.json").is_file()
    finally:
        decoy.kill()
        if driver.poll() is None:
            driver.kill()
        for proc in _session(driver.pid):  # only if the reaper failed: this test's own processes
            proc.kill()
