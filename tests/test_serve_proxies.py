"""`gpt1 serve` behind proxies and in containers: streams that a proxy's read timeout would cut,
a proxy's Host, the docs and redirects under a path prefix, requests whose client went away, TLS.
Real servers on loopback; what a proxy sees is asserted on the server's own answers (no proxy in
the tests). How the server starts (the port, signals meanwhile) is in test_serve_startup.py."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import threading
from urllib.parse import urljoin

import httpx
import openai
import pytest

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.serve import background_server, create_app, streaming
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_serve_api import MSG, endless_model_dir, wait_for


@pytest.fixture(scope="module")
def endless(tiny_config, tokenizer, tmp_path_factory):
    """Never ends a reply on its own: a request runs until max_tokens, or until its client leaves."""
    return gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("endless"), 2048), device="cpu")


# ---- keep-alive comments in streams --------------------------------------------------------------
def _body(path: str) -> dict:
    prompt = {"messages": MSG} if path == "chat/completions" else {"prompt": "the"}
    return {"model": "m", **prompt, "max_tokens": 6, "temperature": 0, "stream": True}


def _events(lines: list[str]) -> list[dict | str]:
    """The stream's data events, without what differs from one request to the next (id, created)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            event = json.loads(data) if data != "[DONE]" else data
            if isinstance(event, dict):
                event.pop("id", None), event.pop("created", None)
            events.append(event)
    return events


class _Hog:
    """A streamed request that holds the server's one slot until closed (the endless model)."""

    def __init__(self, url: str):
        self.client = httpx.Client(timeout=30)
        self.response = self.client.send(
            httpx.Request("POST", f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2000, "stream": True}),
            stream=True)
        assert self.response.status_code == 200
        # Kept: an iterator of httpx's dropped unfinished closes the connection (the request is cancelled).
        self.lines = self.response.iter_lines()
        next(line for line in self.lines if line.startswith("data: "))  # generating: the slot is taken

    def close(self) -> None:
        self.response.close()
        self.client.close()


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_a_stream_queued_behind_another_sends_keep_alive_comments(endless, monkeypatch, path):
    """A stream sent nothing while its request waited for a slot (the completion stream not even an
    opening event) or between slow tokens: nginx's proxy_read_timeout (60 s) cut it. Now an SSE
    comment goes out after KEEPALIVE_S without a byte; the events are those of the stream alone, and
    the openai client reads it as any other."""
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.2)
    with background_server(create_app(endless, max_batch=1)) as url:
        with httpx.stream("POST", f"{url}/v1/{path}", json=_body(path), timeout=30) as alone:
            expected = _events(list(alone.iter_lines()))
        hog = _Hog(url)
        try:
            with httpx.stream("POST", f"{url}/v1/{path}", json=_body(path), timeout=30) as queued:
                lines = queued.iter_lines()
                seen = []
                for line in lines:  # until the first comment: the request still waits for the slot
                    seen.append(line)
                    if line.startswith(":"):
                        break
                assert not any(e != "[DONE]" and any(c.get("text") or c.get("delta", {}).get("content")
                                                     for c in e["choices"]) for e in _events(seen)), seen
                hog.close()  # the slot is freed: the request runs
                seen += list(lines)
        finally:
            hog.close()
        assert ": keep-alive" in seen and {line for line in seen if line.startswith(":")} == {": keep-alive"}
        assert _events(seen) == expected and expected[-1] == "[DONE]"

        hog = _Hog(url)
        threading.Timer(0.7, hog.close).start()  # some keep-alives first
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30) as client:
            body = {k: v for k, v in _body(path).items() if k != "stream"}
            create = client.chat.completions.create if path == "chat/completions" else client.completions.create
            text = "".join((c.choices[0].delta.content or "") if path == "chat/completions" else c.choices[0].text
                           for c in create(**body, stream=True) if c.choices)
        reply = "".join(e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or ""
                        for e in expected if e != "[DONE]" and e["choices"])
        assert text == reply and text


def test_a_stream_with_tokens_coming_sends_no_keep_alive(llm):
    """The comment is for a stream that is silent: one whose tokens come has none."""
    with background_server(create_app(llm)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=_body("completions"), timeout=30) as r:
            lines = list(r.iter_lines())
    assert not any(line.startswith(":") for line in lines) and lines[-2] == "data: [DONE]"


# ---- a proxy's Host ------------------------------------------------------------------------------
def test_allowed_hosts_pass_the_keyless_loopback_servers_host_check(llm):
    """Behind a proxy that passes its own Host (Caddy, Traefik, nginx `Host $host`, or an `upstream
    gpt1` block: Host: gpt1) a keyless server answered 403 to everything."""
    with background_server(create_app(llm, allowed_hosts=["gpt1", "Chat.Example.com.", "[::2]"])) as url:
        for host in ("gpt1", "GPT1:8000", "chat.example.com", "[::2]:443", "localhost"):
            assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
        r = httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host"
        assert "or chat.example.com" not in r.json()["error"]["message"]  # sorted: ::2, chat.example.com, gpt1
        assert "a loopback address, ::2, chat.example.com or gpt1 (a guard against DNS" in r.json()["error"]["message"]
    for bad in ("http://gpt1", "gpt1:8000", "*", "", "a/b"):
        with pytest.raises(Gpt1Error, match="expected a host name as a Host header gives it"):
            create_app(llm, allowed_hosts=[bad])
    with pytest.raises(Gpt1Error, match="expected a list of host names"):
        create_app(llm, allowed_hosts="gpt1")


def test_an_allowed_host_that_is_no_name_is_one_line_before_the_model_loads(tmp_path, capsys):
    line = assert_one_clear_line(*run_main(capsys, "serve", "--model", tmp_path / "no-model", "--allowed-host",
                                           "https://chat.example.com"))
    assert "--allowed-host 'https://chat.example.com': expected a host name" in line


# ---- under a path prefix -------------------------------------------------------------------------
PROXIED = "https://chat.example.com/gpt1/"  # where a proxy serves the server (nginx `location /gpt1/`)


def test_the_docs_and_redirects_stay_under_a_proxys_prefix(llm):
    """/docs loaded /openapi.json (a 404 behind `location /gpt1/`), and the 307 of /v1/models/ named
    the Host header's absolute URL, without the prefix or the port."""
    with background_server(create_app(llm, allowed_hosts=["chat.example.com"])) as url:
        swagger = re.search(r"url: '([^']*)'", httpx.get(f"{url}/docs").text)[1]
        redoc = re.search(r'spec-url="([^"]*)"', httpx.get(f"{url}/redoc").text)[1]
        for page, schema in (("docs", swagger), ("redoc", redoc)):
            assert urljoin(PROXIED + page, schema) == PROXIED + "openapi.json", schema
            assert "/v1/chat/completions" in httpx.get(urljoin(f"{url}/{page}", schema)).json()["paths"]
        # "Try it out" sends to the schema's server, relative to the schema: under the prefix too.
        server = httpx.get(f"{url}/openapi.json").json()["servers"][0]["url"]
        assert urljoin(PROXIED + "openapi.json", server) == PROXIED

        headers = {"Host": "chat.example.com"}  # as `proxy_set_header Host $host` passes it
        for path, to in (("v1/models/", "v1/models"), ("v1/models/?x=1", "v1/models?x=1"), ("health/", "health"),
                         ("v1/models/a%20b/", "v1/models/a%20b")):
            r = httpx.get(f"{url}/{path}", headers=headers)
            assert r.status_code == 307 and urljoin(PROXIED + path, r.headers["location"]) == PROXIED + to, r.headers
        assert httpx.get(f"{url}/v1/models//").json()["error"]["code"] == "not_found"
        assert httpx.get(f"{url}/v1/models/", follow_redirects=True).json()["data"]
        r = httpx.post(f"{url}/v1/chat/completions/", json={"messages": MSG, "max_tokens": 2}, follow_redirects=True,
                       timeout=30)
        assert r.status_code == 200 and r.json()["choices"]
        assert httpx.get(f"{url}/v1/nope/").json()["error"]["code"] == "not_found"

        # The 404 of a base_url without /v1 names no address: behind a proxy it is the proxy's.
        message = httpx.post(f"{url}/chat/completions", json={}).json()["error"]["message"]
        assert "an OpenAI client's base_url ends in /v1" in message


# ---- a client that went away ---------------------------------------------------------------------
def test_a_request_whose_client_went_away_has_its_access_log_line(endless, capsys):
    """A request dropped by its client (a proxy's timeout, a user gone) left no line in the access
    log: uvicorn writes none for the 499 that nobody reads."""
    with background_server(create_app(endless), log_level="info") as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions?x=1", json={"prompt": "x", "max_tokens": 2000}, timeout=0.5)
        out: list[str] = []
        wait_for(lambda: out.append(capsys.readouterr().out) or " 499 " in "".join(out), timeout=30,
                 what="the access-log line")
    line = next(line for line in "".join(out).splitlines() if " 499 " in line)
    assert re.search(r'127\.0\.0\.1:\d+ - "POST /v1/completions\?x=1 HTTP/1\.1" 499 after \d+\.\d s: the client '
                     r"went away; cancelled$", line), line


# ---- TLS -----------------------------------------------------------------------------------------
def _self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made by the `cryptography` package or the openssl CLI."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI to make a certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return str(cert), str(key)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(cert), str(key)


def test_https_with_a_certificate_and_its_key(llm, tmp_path):
    cert, key = _self_signed(tmp_path)
    with background_server(create_app(llm), ssl_certfile=cert, ssl_keyfile=key) as url:
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=cert)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                           http_client=httpx.Client(verify=trusted)) as client:
            assert client.chat.completions.create(model="m", messages=MSG, max_tokens=2).choices
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused, as it should be
            httpx.get(f"{url}/health")
    both = tmp_path / "both.pem"
    both.write_text(open(cert).read() + open(key).read())
    with background_server(create_app(llm), ssl_certfile=str(both)) as url:  # the key after the certificate
        assert httpx.get(f"{url}/health", verify=trusted).json()["status"] == "ok"


def test_tls_files_that_cannot_serve_are_one_line_before_the_model_loads(tmp_path, capsys):
    cert, key = _self_signed(tmp_path)
    model = tmp_path / "no-model"  # never reached: the files are checked first
    for flags, said in (((("--ssl-certfile", tmp_path / "nope.pem"),), r"cannot read the TLS certificate .*nope\.pem: "
                                                                       r"No such file"),
                        ((("--ssl-certfile", cert),), r"cert\.pem: expected PEM files: the certificate, and its key"),
                        ((("--ssl-certfile", key), ("--ssl-keyfile", key)), r"expected PEM files"),
                        ((("--ssl-keyfile", key),), r"--ssl-keyfile needs --ssl-certfile")):
        argv = [a for flag in flags for a in flag]
        assert_one_clear_line(*run_main(capsys, "serve", "--model", model, *argv), said)
