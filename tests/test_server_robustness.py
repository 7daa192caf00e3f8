"""The HTTP server when things go wrong: failing and stalled model batches, slow clients, clients that leave,
overload, API keys, quiet streams, and the serve tool's warnings and Ctrl-C with a stuck model thread.

Faults are injected through AsyncModel's `faults` (or CLLM_FAULT for the serve tool's process), slow clients are
raw sockets on loopback, and nothing waits on a timing it cannot bound: each wait for the server's reaction
is a socket or client timeout far beyond the configured deadline.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from cllm.generate import Decoder
from cllm.server import ServerLimits
from cllm.serving import ServingFault
from cllm.tools.serve import REFUSALS_UNLOGGED, BackgroundServer
from tests.test_server import (IDLE, NAME, Gate, assert_error, eventually, model, model_path,  # noqa: F401
                               slow_decoding, sse_events, tokenizer)

pytestmark = pytest.mark.timeout(90)

EMBEDDING = {"model": NAME, "input": "the quick fox"}
GREEDY = {"model": NAME, "prompt": "the", "max_tokens": 5, "temperature": 0}


def client(server: BackgroundServer, **headers) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, headers=headers)


# --------------------------------------------------------------------------------------------------------------
# failing and stalled batches


def test_a_failing_batch_is_500_and_the_next_request_is_served(model_path, caplog):
    faults = [ServingFault("raise", "embed", 1), ServingFault("raise", "decode", 1)]
    with BackgroundServer(model_path, model_name=NAME, faults=faults) as server, client(server) as http:
        error = assert_error(http.post("/v1/embeddings", json=EMBEDDING), 500, type="server_error")
        assert "injected" not in error["message"]
        assert http.post("/v1/embeddings", json=EMBEDDING).status_code == 200
        assert_error(http.post("/v1/completions", json=GREEDY), 500, type="server_error")
        assert http.post("/v1/completions", json=GREEDY).json()["usage"]["completion_tokens"] == 5
        assert http.get("/health").json()["status"] == "ok"
    logged = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert len(logged) == 2, "each failure's traceback goes to the log"


def test_a_stalled_batch_is_503_and_health_says_why(model_path):
    faults = [ServingFault("hang", "embed", 1), ServingFault("hang", "decode", 1),
              ServingFault("hang", "decode", 2)]
    with BackgroundServer(model_path, model_name=NAME, batch_timeout=1, faults=faults) as server, \
            client(server) as http:
        error = assert_error(http.post("/v1/embeddings", json=EMBEDDING), 503, type="server_error")
        assert error["code"] == "engine_stalled" and "1 s deadline" in error["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        assert "embedding batch" in health.json()["reason"]
        assert http.post("/v1/embeddings", json=EMBEDDING).status_code == 200  # served on, by another thread

        assert assert_error(http.post("/v1/completions", json=GREEDY), 503, type="server_error")["code"] == \
            "engine_stalled"
        streamed = http.post("/v1/completions", json=GREEDY | {"stream": True})
        assert streamed.status_code == 200  # queued, then stalled: the error is the stream's last event
        events = sse_events(streamed)
        assert json.loads(events[-1])["error"]["code"] == "engine_stalled" and "[DONE]" not in events
        assert http.post("/v1/completions", json=GREEDY).json()["usage"]["completion_tokens"] == 5
        assert http.get("/health").status_code == 503  # the stuck threads never end
    assert not server.thread.is_alive(), "stopping the server waited for the stuck threads"


# --------------------------------------------------------------------------------------------------------------
# slow clients


def slow_request(port: int, *, declared: int = 100, sent: bytes = b"{") -> socket.socket:
    """A connection that sends a request's headers and part of its body, then nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (declared, sent))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_slow_bodies_hold_no_request_slot(model_path):
    limits = ServerLimits(max_concurrent_requests=2, body_timeout=60)
    with BackgroundServer(model_path, model_name=NAME, limits=limits) as server, client(server) as http:
        slow = [slow_request(server.port) for _ in range(5)]  # more than the slots
        try:
            deadline = time.monotonic() + 20
            while len(server.server.server_state.tasks) < len(slow):  # the app has all five requests
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for _ in range(3):  # long before the slow bodies' 60 s are up
                response = http.post("/v1/embeddings", json=EMBEDDING)
                assert response.status_code == 200, response.text
        finally:
            for sock in slow:
                sock.close()


def test_a_body_that_does_not_arrive_in_time_is_408(model_path):
    with BackgroundServer(model_path, model_name=NAME, limits=ServerLimits(body_timeout=0.5)) as server:
        with slow_request(server.port) as sock:
            response = read_until_closed(sock)  # the server closes the connection after its answer
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), response
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        assert "0.5 s" in error["message"]
        with client(server) as http:
            assert http.post("/v1/embeddings", json=EMBEDDING).status_code == 200


def test_slow_headers_are_cut_off(model_path):
    with BackgroundServer(model_path, model_name=NAME, limits=ServerLimits(header_timeout=0.5)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and the rest never comes
            assert read_until_closed(sock) == b""
        # On a kept-alive connection too: the next request's headers have the same deadline.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            first = b""
            while not first.endswith(b'"slots_processing":0}'):  # the end of /health's body
                first += sock.recv(65536)
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            assert read_until_closed(sock) == b""
        with client(server) as http:
            assert http.get("/health").status_code == 200


def post(port: int, path: str, body: dict) -> socket.socket:
    """A connection with one whole request on it."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer from a connection: its status, headers (lower-case names) and body (by its Content-Length)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def test_a_client_that_leaves_before_its_whole_completion_frees_every_row(model_path, monkeypatch):
    with BackgroundServer(model_path, model_name=NAME) as server, client(server) as http:
        slow_decoding(server.model, monkeypatch, 0.2)  # 40 tokens: 8 s for the first 8 choices, 8 more for the rest
        body = {"model": NAME, "prompt": "the", "max_tokens": 40, "n": 16, "temperature": 0}
        with post(server.port, "/v1/completions", body):  # not streamed: nothing comes back until the end
            assert eventually(lambda: http.get("/health").json()["slots_processing"] == 8, 10)
            assert http.get("/health").json()["queued"]["generate"] == 8  # the other 8 choices wait for rows
        # The client has gone: its choices stop, in the rows and in the queue, long before their 16 s.
        assert eventually(lambda: http.get("/health").json() == IDLE, 3), http.get("/health").json()


# --------------------------------------------------------------------------------------------------------------
# overload


def test_with_the_defaults_256_concurrent_requests_are_queued_and_answered(model_path, monkeypatch):
    with BackgroundServer(model_path, model_name=NAME) as server, client(server) as http:
        held, release = [], threading.Event()
        embed_batch = server.model._embed_batch

        def hold_the_first_batch(workspaces, batch):  # in the model's worker thread
            if not held:
                held.append(len(batch))
                release.wait(30)
            return embed_batch(workspaces, batch)

        monkeypatch.setattr(server.model, "_embed_batch", hold_the_first_batch)
        connections = [post(server.port, "/v1/embeddings", EMBEDDING) for _ in range(256)]
        try:
            # Every request waits for the model at once: in the batch it holds, or in its queue.
            assert eventually(lambda: held and held[0] + http.get("/health").json()["queued"]["embed"] == 256, 15)
        finally:
            release.set()
        statuses = [read_response(sock)[0] for sock in connections]
        for sock in connections:
            sock.close()
        assert statuses == [200] * 256


def test_a_refusal_comes_at_once_with_retry_after_before_the_body_is_read(model_path, monkeypatch, caplog):
    limits = ServerLimits(max_concurrent_requests=1, body_timeout=60)
    with BackgroundServer(model_path, model_name=NAME, limits=limits) as server, client(server) as http:
        gate = Gate(server.model.embed)
        monkeypatch.setattr(server.model, "embed", gate)
        with post(server.port, "/v1/embeddings", EMBEDDING) as in_flight:
            try:
                assert gate.entered.wait(10)  # the one slot is taken
                answers = []
                for _ in range(3):
                    with slow_request(server.port) as refused:  # its body never comes: a refusal must not wait
                        refused.settimeout(5)
                        answers.append(read_response(refused))
            finally:
                gate.opened.set()
            assert read_response(in_flight)[0] == 200
        for status, headers, body in answers:
            assert status == 429 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["type"] == "rate_limit_error"
        assert http.post("/v1/embeddings", json=EMBEDDING).status_code == 200  # the slot is free again
    warnings = [r.getMessage() for r in caplog.records if r.name == "cllm.server.middleware"]
    assert len(warnings) == 1 and warnings[0].startswith("too many requests: 1 refused"), warnings


def test_refusals_stay_out_of_the_access_log():
    def access_record(status: int) -> logging.LogRecord:  # as uvicorn writes it
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5000", "POST", "/v1/embeddings", "1.1", status), None)

    assert [REFUSALS_UNLOGGED.filter(access_record(status)) for status in (200, 400, 429, 503)] == \
        [True, True, False, True]


# --------------------------------------------------------------------------------------------------------------
# API keys


def test_an_api_key_is_required_everywhere_but_health(model_path):
    with BackgroundServer(model_path, model_name=NAME, api_key="s3cret") as server:
        base_url = f"{server.url}/v1"
        with openai.OpenAI(base_url=base_url, api_key="s3cret", max_retries=0, timeout=30) as right:
            assert len(right.embeddings.create(model=NAME, input="the fox").data) == 1
            # Greedy: a sampled continuation could draw the document separator and end before 3 tokens.
            assert right.completions.create(model=NAME, prompt="the", max_tokens=3,
                                            temperature=0).usage.completion_tokens == 3
        with openai.OpenAI(base_url=base_url, api_key="s3cres", max_retries=0, timeout=30) as wrong:
            with pytest.raises(openai.AuthenticationError) as info:
                wrong.embeddings.create(model=NAME, input="the fox")
            assert info.value.code == "invalid_api_key"
        with client(server) as http:
            for method, path in [("POST", "/v1/embeddings"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                                 ("GET", "/info"), ("GET", "/nowhere")]:
                error = assert_error(http.request(method, path, json=EMBEDDING), 401)
                assert error["code"] == "invalid_api_key" and "Authorization" in error["message"]
            assert http.get("/health").json()["status"] == "ok"  # a load balancer's probe has no key
        for authorization in ("s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2"):
            with client(server, Authorization=authorization) as http:
                assert_error(http.post("/v1/embeddings", json=EMBEDDING), 401)
        with client(server, Authorization="bearer s3cret") as http:  # the scheme is case-insensitive
            assert http.post("/v1/embeddings", json=EMBEDDING).status_code == 200


# --------------------------------------------------------------------------------------------------------------
# quiet streams


def test_a_stream_waiting_for_its_first_token_sends_keep_alive_comments(model_path, monkeypatch):
    opened = threading.Event()
    prefill_rows = Decoder.prefill_rows

    def held_prefill(self, *args, **kwargs):  # the stream's first token waits until the test has seen enough
        opened.wait(30)
        return prefill_rows(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "prefill_rows", held_prefill)
    with BackgroundServer(model_path, model_name=NAME, keep_alive_interval=0.05) as server, client(server) as http:
        with http.stream("POST", "/v1/completions", json=GREEDY | {"stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            comments = 0
            while comments < 2:
                line = next(lines)
                assert line in (": keep-alive", ""), line
                comments += line == ": keep-alive"
            opened.set()
            rest = list(lines)
        data = [json.loads(line[len("data: "):]) for line in rest if line.startswith("data: {")]
        assert rest[-2:] == ["data: [DONE]", ""]
        whole = http.post("/v1/completions", json=GREEDY).json()
        assert "".join(d["choices"][0]["text"] for d in data) == whole["choices"][0]["text"]


# --------------------------------------------------------------------------------------------------------------
# the serve tool


def start_serve(model_path, *args, env=None) -> tuple[subprocess.Popen, list[str], str]:
    """The serve tool in its own process: (process, the stderr lines up to the announcement, the API's URL)."""
    process = subprocess.Popen([sys.executable, "-m", "cllm.tools.serve", str(model_path), "--port", "0",
                                "--model-name", NAME, *args], stderr=subprocess.PIPE, text=True,
                               env=os.environ | (env or {}))
    lines = []
    while " on http://" not in (line := process.stderr.readline()):
        assert line, "".join(lines) + process.stderr.read()
        lines.append(line)
    port = line.split(" on http://")[1].split("/")[0].rsplit(":", 1)[1]
    return process, lines, f"http://127.0.0.1:{port}"


def interrupt(process: subprocess.Popen) -> str:
    """Ctrl-C; the rest of stderr, once the process has exited."""
    try:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        return stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_tool_answers_a_stall_with_503_and_ctrl_c_does_not_wait_for_it(model_path):
    process, _, url = start_serve(model_path, "--batch-timeout", "1", env={"CLLM_FAULT": "hang:embed:1"})
    try:
        error = assert_error(httpx.post(f"{url}/v1/embeddings", json=EMBEDDING, timeout=30), 503, type="server_error")
        assert error["code"] == "engine_stalled"
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "stalled"
    finally:
        stderr = interrupt(process)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith("serve: interrupted")


def test_serve_tool_takes_its_key_from_the_environment_and_warns_without_one_beyond_loopback(model_path):
    process, before, url = start_serve(model_path, env={"CLLM_API_KEY": "s3cret"})
    try:
        assert not before
        assert httpx.post(f"{url}/v1/embeddings", json=EMBEDDING, timeout=30).status_code == 401
        with_key = httpx.post(f"{url}/v1/embeddings", json=EMBEDDING, timeout=30,
                              headers={"Authorization": "Bearer s3cret"})
        assert with_key.status_code == 200
    finally:
        interrupt(process)
    process, before, _ = start_serve(model_path, "--host", "0.0.0.0", env={"CLLM_API_KEY": ""})
    interrupt(process)
    assert len(before) == 1 and before[0].startswith("serve: warning: listening on 0.0.0.0 without an API key")
