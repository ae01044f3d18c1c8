"""Pytest fixtures for the Xero simulator's fidelity tests.

The simulator is started once per session: from the binary named by
XERO_SIM_BIN if set, else with `cargo run -q -p xero-sim`. It binds a free
loopback port, prints `xero-sim listening on http://127.0.0.1:PORT`, and the
fixture waits until `/_sim/health` answers. Every test starts from
`POST /_sim/reset`.
"""

import os
import pathlib
import subprocess
import threading
import time

import pytest
import requests

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
OPENAPI_DIR = pathlib.Path(
    os.environ.get("XERO_OPENAPI_DIR")
    or os.path.join(REPO_ROOT, "..", "shared", "xero-openapi")
)

HOLDINGS = "5b3ca1e0-0d1f-4c5e-9a11-000000000001"
TRADING = "5b3ca1e0-0d1f-4c5e-9a11-000000000002"
CLIENT_ID = "ledgerport-demo"
CLIENT_SECRET = "demo-secret"


def _command():
    binary = os.environ.get("XERO_SIM_BIN")
    if binary:
        return [binary, "--port", "0"]
    return ["cargo", "run", "-q", "-p", "xero-sim", "--", "--port", "0"]


@pytest.fixture(scope="session")
def sim_url():
    proc = subprocess.Popen(
        _command(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    found = {}

    def reader():
        for line in proc.stdout:
            if "listening on " in line and "url" not in found:
                found["url"] = line.strip().split("listening on ", 1)[1]

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.time() + 900  # a cold `cargo run` may have to compile
    url = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"xero-sim exited early with {proc.returncode}")
        url = found.get("url")
        if url:
            try:
                if requests.get(url + "/_sim/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
        time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("xero-sim did not start")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def sim(sim_url):
    r = requests.post(sim_url + "/_sim/reset", timeout=5)
    assert r.status_code == 204
    return sim_url


@pytest.fixture()
def grant(sim):
    """Tokens for a fresh grant connected to both default tenants."""
    r = requests.post(sim + "/_sim/grants", json={}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()
