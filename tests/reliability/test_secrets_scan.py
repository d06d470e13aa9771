"""No credentials, host names, user names or home folders in committed files, nor in a fresh run record."""
from __future__ import annotations

import getpass
import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("isolated_course")

REPO = Path(__file__).resolve().parents[2]
#: User and host names too common to mean anything when found in a text.
GENERIC = {"root", "user", "runner", "jovyan", "ubuntu", "admin", "localhost", "vagrant", "codespace", "colab"}
SECRET_PATTERNS = {
    "AWS access key": re.compile(r"AKIA[0-9A-Z]{16}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credential assignment": re.compile(
        r"""(?i)\b(?:token|password|passwd|secret|api_key|apikey)\s*[:=]\s*["'](?!\{|<|\$|\*+["'])[^"'\s]{6,}["']"""),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
}


def identity_patterns(home: Path | None = None, user: str | None = None, host: str | None = None) -> dict:
    """Patterns for this machine's home folder, user name and host name (generic or very short names skipped:
    they cannot be told from ordinary words)."""
    home = str(home or Path.home()).rstrip("/")
    user, host = user or getpass.getuser(), host or socket.gethostname()
    out = {}
    if home not in ("", "/"):
        out["home folder"] = re.compile(re.escape(home) + r"(?=/|\b)")
    if user and user.lower() not in GENERIC and len(user) >= 3:
        out["user name"] = re.compile(rf"(?<![\w-]){re.escape(user)}(?![\w-])")
    if host and host.lower() not in GENERIC and len(host) >= 4:
        out["host name"] = re.compile(rf"(?<![\w.-]){re.escape(host)}(?![\w-])")
    return out


def scan(text: str, patterns: dict) -> list[str]:
    return [f"{what}: {m.group(0)!r}" for what, pattern in patterns.items() for m in pattern.finditer(text)]


def test_the_scan_finds_what_it_looks_for():
    # built at run time, so that this file itself holds no string the scan of the tree would flag
    leaky = (f'aws = "{"AKIA" + "ABCDEFGHIJKLMNOP"}"\n{"-----BEGIN RSA " + "PRIVATE KEY-----"}\npassword = "hunter22!"\n'
             'cd /home/alice-q7/course && ssh build-box-17')
    found = scan(leaky, {**SECRET_PATTERNS, **identity_patterns(Path("/home/alice-q7"), "alice-q7", "build-box-17")})
    assert {f.split(":")[0] for f in found} == {"AWS access key", "private key", "credential assignment",
                                                 "home folder", "user name", "host name"}
    assert not scan('token = os.environ["RAY_AUTH_TOKEN"]\npassword = "{password}"', SECRET_PATTERNS)


def test_no_secrets_or_machine_identity_in_committed_files():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    patterns = {**SECRET_PATTERNS, **identity_patterns()}
    leaks = []
    for name in filter(None, listed.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:          # binary (PNG, .pt)
            continue
        leaks += [f"{name}: {hit}" for hit in scan(data.decode("utf-8", "replace"), patterns)]
    assert not leaks, "found in committed files:\n" + "\n".join(leaks[:20])


def test_a_fresh_run_record_holds_no_home_folder_or_user_name(tmp_path, monkeypatch):
    """A small in-process run as a student 'alice-q7' whose course lives in her home folder: load a tiny stand-in,
    train a linear model for one epoch, save a run record with an artifact inside and one outside results/."""
    import torch
    from torch import nn

    from labkit import results, train
    from labkit.data.alzheimer import load_alzheimer
    from labkit.data.synth_mri import write_alzheimer_standin
    from labkit.env import environment

    home = tmp_path / "home" / "alice-q7"
    course = home / "labkit-course"
    (course / "labs").mkdir(parents=True)
    (course / "labkit").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USER", "alice-q7")
    monkeypatch.setenv("LOGNAME", "alice-q7")
    monkeypatch.setenv("LABKIT_HOME", str(course))
    monkeypatch.setenv("LABKIT_RESULTS", str(course / "results"))
    monkeypatch.chdir(course / "labs")
    assert str(Path.home()) == str(home) and getpass.getuser() == "alice-q7"

    write_alzheimer_standin(course / "data" / "alzheimer", n_train=8, n_test=4, size=(32, 32), progress=False)
    ds = load_alzheimer(data="auto", data_dir="data/alzheimer", image_size=16, progress=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))
    history = train.fit(model, ds.loader("train", 4), ds.loader("test", 4), epochs=1, lr=1e-3, device="cpu",
                        progress=False)
    record = results.RunRecord(lab="01_baseline", params={"data_dir": "data/alzheimer", "epochs": 1},
                               env=environment("cpu"), data=ds.describe(), epochs=history,
                               final={"test_acc": history[-1]["val_acc"]})
    plot = results.lab_dir("01_baseline") / "curves.png"
    plot.write_bytes(b"png")
    record.add_artifact(plot)
    elsewhere = home / "exports" / "predictions.csv"
    record.add_artifact(elsewhere)
    path = results.save(record)
    text = path.read_text()
    leaks = scan(text, {**SECRET_PATTERNS, **identity_patterns(home, "alice-q7", socket.gethostname())})
    assert not leaks, f"{path.name} leaks {leaks}"
    saved = json.loads(text)
    assert saved["data"]["root"] == "data/alzheimer" and saved["artifacts"] == ["01_baseline/curves.png",
                                                                                "~/exports/predictions.csv"]
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
