"""Code staging to (emulated) GCS and the agent TPU workers run, against fake-gcs-server.

The agent runs here as it runs on a worker: `bash -c <agent_command(...)>` with a stdin pipe standing
in for the ssh session, fetching from the emulated bucket through gcsfs.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher.tpu import agent
from launcher.tpu.staging import StagingError, render_staging, stage_code, stage_file
from trainers.core import storage

PREFIX = "gs://vl-test/staging-tests"


def _tree(root: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return sorted(files)


def _info(url: str) -> dict:
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)
    return fs.info(path)


def _start_agent(tmp_path: Path, staged, argv: list[str], config_url="", config_md5="", grace_s=30.0):
    command = agent.agent_command(
        python=sys.executable,
        workdir=str(tmp_path / "worker"),
        code_url=staged.url,
        code_md5=staged.md5,
        config_url=config_url,
        config_md5=config_md5,
        env={"VL_GREETING": "hello there"},
        argv=argv,
        grace_s=grace_s,
    )
    return subprocess.Popen(
        ["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Read everything while keeping stdin open (closing it would mean "stop"), then the exit code."""
    out = proc.stdout.read().decode()
    code = proc.wait(timeout=60)
    proc.stdin.close()
    return code, out


def _read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for raw in proc.stdout:
        lines.append(raw.decode().rstrip("\n"))
        if marker in lines[-1]:
            return lines
    raise AssertionError(f"agent ended before printing {marker!r}: {lines}")


@pytest.fixture
def program(tmp_path) -> tuple[Path, list[str]]:
    """A small 'repository' whose main reads the config and exits with the code it names."""
    src = tmp_path / "src"
    files = _tree(
        src,
        {
            "job/main.py": textwrap.dedent(
                """
                import os, sys
                from job import helper
                config = open(sys.argv[1]).read().strip()
                print("config:", config, "workdir:", sys.argv[2], "env:", os.environ["VL_GREETING"])
                print("helper:", helper.VALUE, file=sys.stderr)
                sys.exit(int(config.split("=")[1]))
                """
            ),
            "job/__init__.py": "",
            "job/helper.py": "VALUE = 42\n",
        },
    )
    return src, files


def test_code_is_content_addressed_with_a_manifest(fake_gcs, program, tmp_path):
    src, files = program
    staged = stage_code(src, files, PREFIX, commit="c0ffee", diff_sha256="d1ff")

    data = storage.read_bytes(staged.url)
    assert staged.url == f"{PREFIX}/code/{hashlib.sha256(data).hexdigest()}.tar.gz"
    assert _info(staged.url)["md5Hash"] == staged.md5
    manifest = json.loads(storage.read_text(staged.manifest_url))
    assert manifest["commit"] == "c0ffee" and manifest["diff_sha256"] == "d1ff"
    assert (manifest["files"], manifest["bytes"]) == (3, len(data))

    # The same files elsewhere (other mtimes) make the same archive; a changed file a new one.
    copy = tmp_path / "copy"
    _tree(copy, {name: (src / name).read_text() for name in files})
    assert stage_code(copy, files, PREFIX).url == staged.url
    (copy / "job/helper.py").write_text("VALUE = 43\n")
    assert stage_code(copy, files, PREFIX).url != staged.url


def test_staging_the_same_code_again_uploads_nothing(fake_gcs, program):
    src, files = program
    first = stage_code(src, files, PREFIX + "/again")
    generation = _info(first.url)["generation"]

    second = stage_code(src, files, PREFIX + "/again")
    assert second.url == first.url and not second.uploaded
    assert _info(first.url)["generation"] == generation


def test_render_staging_names_the_object_and_touches_no_bucket(program):
    src, files = program
    text = render_staging(
        src, files, "gs://nowhere-bucket/p", commit="abc", extra_files=[(Path("c.yaml"), "gs://x/c")]
    )
    assert "gs://nowhere-bucket/p/code/" in text and "3 files" in text and "commit abc" in text
    assert "c.yaml" in text and "gs://x/c" in text


def test_staging_to_a_bucket_that_does_not_exist_says_so(fake_gcs, program):
    src, files = program
    with pytest.raises(
        StagingError, match=r"failed: bucket gs://no-such-bucket does not exist .*backend.bucket="
    ):
        stage_code(src, files, "gs://no-such-bucket/runs")


def test_staging_a_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(StagingError, match="not a file"):
        stage_code(tmp_path, ["nope.py"], PREFIX)


def test_agent_fetches_runs_and_passes_the_exit_code_through(fake_gcs, program, tmp_path):
    src, files = program
    staged = stage_code(src, files, PREFIX)
    (tmp_path / "config.yaml").write_text("exit=7\n")
    config_url = f"{PREFIX}/configs/config.yaml"
    config_md5 = stage_file(tmp_path / "config.yaml", config_url)

    proc = _start_agent(
        tmp_path, staged, ["python3", "-m", "job.main", "{config}", "{workdir}"], config_url, config_md5
    )
    code, out = _finish(proc)
    lines = out.splitlines()
    assert code == 7, lines
    assert agent.STARTED in lines
    workdir = tmp_path / "worker"
    assert f"config: exit=7 workdir: {workdir} env: hello there" in lines
    assert "helper: 42" in lines  # stderr streamed too; the code's package importable from its dir
    assert lines.index(agent.STARTED) < lines.index("helper: 42")
    assert (workdir / "code" / staged.sha256 / "job" / "main.py").is_file()

    # A restart on the same VM reuses the extracted code.
    proc = _start_agent(
        tmp_path, staged, ["python3", "-m", "job.main", "{config}", "{workdir}"], config_url, config_md5
    )
    code, out = _finish(proc)
    assert code == 7 and "already here" in out


def test_a_replaced_object_is_a_checksum_mismatch(fake_gcs, program, tmp_path):
    src, files = program
    staged = stage_code(src, files, PREFIX + "/replaced")
    storage.write_bytes(staged.url, b"not the staged archive")  # someone overwrites it in the bucket

    proc = _start_agent(tmp_path, staged, ["python3", "-c", "print('must not run')"])
    code, text = _finish(proc)
    assert code == agent.EXIT_CHECKSUM, text
    assert "checksum mismatch" in text and staged.url in text
    assert "must not run" not in text and agent.STARTED not in text


def test_closing_stdin_sigterms_the_program(fake_gcs, program, tmp_path):
    src, files = program
    staged = stage_code(src, files, PREFIX)
    marker = tmp_path / "stopped"
    script = (
        "import signal, sys, time\n"
        f"def stop(*a):\n    open({str(marker)!r}, 'w').write('SIGTERM'); sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    )
    proc = _start_agent(tmp_path, staged, ["python3", "-c", script])
    _read_until(proc, "ready")
    proc.stdin.close()  # what the launcher does to stop a worker: close the ssh session's stdin
    assert proc.wait(timeout=30) == 75
    assert marker.read_text() == "SIGTERM"


def test_a_program_that_ignores_sigterm_is_killed_after_the_grace_period(fake_gcs, program, tmp_path):
    src, files = program
    staged = stage_code(src, files, PREFIX)
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    proc = _start_agent(tmp_path, staged, ["python3", "-c", script], grace_s=0.5)
    _read_until(proc, "ready")
    proc.send_signal(signal.SIGTERM)  # the agent itself told to stop (bash exec'd it)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL


def test_a_program_left_by_a_killed_agent_is_stopped_before_the_next_one_starts(fake_gcs, program, tmp_path):
    """A lost connection can leave an earlier run's trainer on the host (it would hold the TPU): the
    next agent in that work dir SIGTERMs it and waits for it to save and exit before it starts."""
    import os

    src, files = program
    staged = stage_code(src, files, PREFIX)
    marker = tmp_path / "stopped"
    script = (
        "import os, signal, sys, time\n"
        f"def stop(*a):\n    time.sleep(1); open({str(marker)!r}, 'w').write('saved'); sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop)\nprint('ready', os.getpid(), flush=True)\ntime.sleep(120)\n"
    )
    first = _start_agent(tmp_path, staged, ["python3", "-c", script], grace_s=10)
    pid = int(_read_until(first, "ready")[-1].split()[1])
    first.kill()  # the agent dies with its session; its program, in a group of its own, runs on
    first.wait(timeout=10)
    os.kill(pid, 0)  # still running

    second = _start_agent(tmp_path, staged, ["python3", "-c", "print('second run')"], grace_s=10)
    code, out = _finish(second)
    lines = out.splitlines()
    assert code == 0, lines
    note = [i for i, line in enumerate(lines) if "a program of an earlier run is still running here" in line]
    assert note and note[0] < lines.index(agent.STARTED) < lines.index("second run"), lines
    assert marker.read_text() == "saved"  # it was given the time to save
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(
    not (Path("/usr/sbin/sshd").exists() and shutil.which("ssh")), reason="needs openssh-server and ssh"
)
def test_through_ssh_the_agent_streams_each_worker_and_stops_them_when_the_launcher_does(
    fake_gcs, program, tmp_path
):
    from infra.fake_tpu.workers import SshdWorkers
    from launcher.tpu import fanout

    src, files = program
    staged = stage_code(src, files, PREFIX)
    key, public = fanout.ensure_keypair(tmp_path / "keys")
    user = getpass.getuser()
    ips = ["127.0.0.2", "127.0.0.3"]
    script = (
        "import os, signal, sys, time\n"
        "def stop(*a):\n"
        f"    open({str(tmp_path)!r} + '/stopped-' + os.environ['WORKER'], 'w').write('SIGTERM'); sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop)\nprint('ready on', os.environ['WORKER'], flush=True)\ntime.sleep(60)\n"
    )
    commands = [
        agent.agent_command(
            python=sys.executable,
            workdir=str(tmp_path / f"worker{i}"),
            code_url=staged.url,
            code_md5=staged.md5,
            config_url="",
            config_md5="",
            env={"WORKER": str(i), "STORAGE_EMULATOR_HOST": fake_gcs.url},
            argv=["python3", "-c", script],
        )
        for i in range(len(ips))
    ]
    lines: list[tuple[int, str]] = []
    with SshdWorkers(tmp_path / "vms", port=2222) as workers:
        workers.node_ready("pod", ips, {"ssh-keys": fanout.ssh_keys_metadata(user, public)})
        fan = fanout.FanOut(
            ips,
            commands,
            ssh=fanout.SshConfig(user, key, port=2222),
            on_line=lambda i, s: lines.append((i, s)),
        )
        fan.start()
        try:
            for _ in range(600):
                if {(i, f"ready on {i}") for i in range(len(ips))} <= set(lines):
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"workers did not start: {lines}")
        finally:
            fan.stop(grace_s=20)  # closes each ssh session's stdin
        assert fan.wait(10) == [75, 75], lines
    assert [(tmp_path / f"stopped-{i}").read_text() for i in range(len(ips))] == ["SIGTERM", "SIGTERM"]
    assert (0, agent.STARTED) in lines and (1, agent.STARTED) in lines
