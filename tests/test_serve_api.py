"""`svfseg serve` over HTTP on 127.0.0.1: a 100 MP query does not hold up small ones; refused calls say why;
--auth from the environment with slowed failures; --threads and --max-queries (issue 22, items 17 and 20)."""
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from serve_setup import free_port, shared_checkpoints, wait_for_server, write_inputs

pytestmark = pytest.mark.slow
WAIT = 90
PASSWORD = "correct horse"
SMALL = 3  # small requests queued behind the big one


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpts = shared_checkpoints(tmp_path_factory)
    port = free_port()
    log = tmp_path_factory.mktemp("serve-api-log") / "serve.log"
    env = {**os.environ, "SVFSEG_SERVE_PASSWORD": PASSWORD}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "svfseg", "serve", "--checkpoint", str(ckpts["svf"]),
                                 "--port", str(port), "--auth", "ann", "--threads", "1", "--max-queries", "3"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(proc, base, log, WAIT)
        yield {"base": base, "ckpt": str(ckpts["svf"]), "proc": proc, "log": log}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]  # refused calls are one line each, not a traceback


class Client:
    """A logged-in client of the page's HTTP API (urllib only; every call has a timeout)."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def login(self, user: str, password: str) -> int:
        data = urllib.parse.urlencode({"username": user, "password": password}).encode()
        try:
            with self.opener.open(self.base + "login", data=data, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def upload(self, path: Path) -> dict:
        b = uuid.uuid4().hex
        head = (f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        body = head + path.read_bytes() + f"\r\n--{b}--\r\n".encode()
        req = urllib.request.Request(self.base + "gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={b}"})
        with self.opener.open(req, timeout=30) as r:
            return {"path": json.loads(r.read())[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def submit(self, data: list) -> str:
        req = urllib.request.Request(self.base + "gradio_api/call/on_run", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
        with self.opener.open(req, timeout=30) as r:
            return json.loads(r.read())["event_id"]

    def result(self, event_id: str) -> tuple[str, object]:
        """("complete" or "error", its data) from the event stream."""
        with self.opener.open(self.base + f"gradio_api/call/on_run/{event_id}", timeout=60) as r:
            text = r.read().decode()
        events = re.findall(r"event: (\w+)\ndata: (.*)", text)
        kind, data = next((k, d) for k, d in events if k in ("complete", "error"))
        return kind, json.loads(data)


def _request(ckpt, support, mask, queries):
    return [ckpt, "(none)", queries, [], support, mask, None, None] + [None] * 16 + ["none", None, None]


@pytest.fixture(scope="module")
def client(server):
    c = Client(server["base"])
    assert c.login("ann", PASSWORD) == 200
    return c


def test_failed_logins_are_slowed_and_the_password_is_not_on_the_command_line(server):
    c = Client(server["base"])
    with pytest.raises(urllib.error.HTTPError):
        c.upload(Path(__file__))  # nothing without logging in
    took = []
    for _ in range(2):
        t0 = time.monotonic()
        assert c.login("ann", "wrong") == 400
        took.append(time.monotonic() - t0)
    assert took[0] >= 0.5 and took[1] >= 1.0  # 0.5 s, then doubled
    t0 = time.monotonic()
    assert c.login("ann", PASSWORD) == 200 and time.monotonic() - t0 < 1.0
    cmdline = Path(f"/proc/{server['proc'].pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline
    assert "(1 torch thread;" in server["log"].read_text()  # --threads 1 applied


def test_small_requests_are_not_held_up_by_a_100_mp_query(server, client, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)  # 100 MP in a small file (the JPEG took 29.6 s and 4 GB)
    sup, msk, q = (client.upload(inputs[k]) for k in ("support", "mask", "query"))
    big = client.upload(huge)
    kind, data = client.result(client.submit(_request(server["ckpt"], sup, msk, [q])))  # loads the model
    assert kind == "complete" and data[0].startswith("**Done.**")
    answers, lock = {}, threading.Lock()

    def small(i):
        t0 = time.monotonic()
        kind, data = client.result(client.submit(_request(server["ckpt"], sup, msk, [q])))
        with lock:
            answers[i] = (kind, data[0], time.monotonic() - t0)

    big_id = client.submit(_request(server["ckpt"], sup, msk, [q, big]))
    threads = [threading.Thread(target=small, args=(i,), daemon=True) for i in range(SMALL)]
    for t in threads:
        t.start()
    kind, data = client.result(big_id)
    for t in threads:
        t.join(timeout=60)
    assert kind == "complete" and data[0].startswith("**Error:** query (huge.png): 10000x10000 pixels (100.0 MP); "
                                                     "at most 25 MP per image (--max-pixels)")
    assert sorted(answers) == list(range(SMALL))
    for kind, status, seconds in answers.values():
        assert kind == "complete" and status.startswith("**Done.**") and seconds < 2.0, answers


def test_too_many_queries_are_refused(server, client, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    sup, msk, q = (client.upload(inputs[k]) for k in ("support", "mask", "query"))
    kind, data = client.result(client.submit(_request(server["ckpt"], sup, msk, [q] * 4)))
    assert kind == "complete" and data[0] == ("**Error:** 4 queries given; at most 3 per request (--max-queries): "
                                              "segment them in several requests")


def test_refused_calls_say_why_in_one_log_line(server, client, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    sup, msk = client.upload(inputs["support"]), client.upload(inputs["mask"])
    not_uploaded = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    kind, data = client.result(client.submit(_request(server["ckpt"], sup, msk, [not_uploaded])))
    assert kind == "error" and "/etc/passwd" in data["error"] and "not uploaded" in data["error"]
    kind, data = client.result(client.submit([server["ckpt"]]))
    assert kind == "error" and "didn't receive enough input values (needed: 27, got: 1)" in data["error"]
    kind, data = client.result(client.submit(_request("/etc/passwd", sup, msk, [])))
    assert kind == "error" and "not in the list of choices" in data["error"]
    assert server["log"].read_text().count("refused an API call") >= 3
