"""The HTTP server under ``appliance serve``: health, authentication, roles,
the access log, configuration checks and the OpenAPI description."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import config
from appliance.errors import ConfigError
from appliance.web import accounts
from appliance.web.app import routes
from appliance.web.auth import PUBLIC, role_of
from appliance.web.openapi import PATHS
from tests import web_site
from tests.web_site import VIEWER, VIEWER_TOKEN


@pytest.fixture(scope="module")
def site(module_appliance_factory):
    # Shared: its tests only read, and each looks for its own calls.
    return web_site.start(module_appliance_factory)


def test_health_needs_no_credentials(site):
    with site.client() as client:
        answer = client.get("/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


def test_anonymous_callers_get_401_with_a_challenge(site):
    with site.client() as client:
        answer = client.get("/openapi.json")
    assert answer.status_code == 401
    assert "Basic" in answer.headers["www-authenticate"]
    assert "Bearer" in answer.headers["www-authenticate"]


def test_a_wrong_password_or_token_gets_401(site):
    with site.client((VIEWER[0], "not-the-password")) as client:
        assert client.get("/openapi.json").status_code == 401
    with site.client(("nobody", VIEWER[1])) as client:
        assert client.get("/openapi.json").status_code == 401
    with site.client() as client:
        bad = {"Authorization": "Bearer not-a-token"}
        assert client.get("/openapi.json", headers=bad).status_code == 401
        garbled = {"Authorization": "Basic %%%"}
        assert client.get("/openapi.json", headers=garbled).status_code == 401

    # Each refusal is in the audit trail, with the name given, never the
    # password or token.
    shown = site.appliance.cli("audit", "show", "--event", "login-refused", "--json")
    refused = [json.loads(line) for line in shown.stdout.splitlines()]
    users = [record["users"][0] for record in refused]
    assert f"{VIEWER[0]}@127.0.0.1" in users and "nobody@127.0.0.1" in users
    assert len(refused) >= 4
    assert "not-the-password" not in shown.stdout and "not-a-token" not in shown.stdout


def test_password_and_token_let_in(site):
    with site.client(VIEWER) as client:
        assert client.get("/openapi.json").status_code == 200
    with site.client() as client:
        token = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
        assert client.get("/openapi.json", headers=token).status_code == 200


def test_every_route_refuses_anonymous_and_underprivileged_callers(site):
    with site.client() as anonymous, site.client(VIEWER) as viewer:
        for made in routes():
            role = role_of(made)
            assert role, f"{made.path} was not made with auth.route"
            if role == PUBLIC:
                continue
            path = made.path.replace("{", "").replace("}", "")
            for method in sorted(made.methods - {"HEAD"}):
                answer = anonymous.request(method, path)
                assert answer.status_code == 401, (method, made.path)
                if role == accounts.OPERATOR:
                    answer = viewer.request(method, path)
                    assert answer.status_code == 403, (method, made.path)


def test_the_access_log_names_routes_and_accounts_only(site):
    secret_name = "Doe^Jane-Secret"
    with site.client(VIEWER) as client:
        client.get("/openapi.json", params={"PatientName": secret_name})
        client.get("/studies/1.2.3.999/series", params={"PatientID": "PID-42"})
    log = site.appliance.log()
    assert "GET /openapi.json 200 reader" in log
    assert secret_name not in log
    assert "PID-42" not in log
    assert "1.2.3.999" not in log


def test_the_openapi_description_covers_every_route(site):
    served = {
        (made.path, method.lower())
        for made in routes()
        for method in made.methods - {"HEAD"}
    }
    described = {(path, method) for path, ops in PATHS.items() for method in ops}
    assert served == described
    for made in routes():
        for method in made.methods - {"HEAD"}:
            assert PATHS[made.path][method.lower()]["x-role"] == role_of(made)
    with site.client(VIEWER) as client:
        document = client.get("/openapi.json").json()
    assert set(document["paths"]) == {path for path, _method in served}


def test_a_port_in_use_stops_the_start_with_a_reason(appliance_factory):
    first = web_site.start(appliance_factory)
    second = appliance_factory({"web": {}}, name="second")
    second.web_port = first.appliance.web_port
    second.write_config()
    result = second.cli("serve", check=False)
    assert result.returncode == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{second.web_port}" in result.stderr


def test_without_accounts_only_health_answers(appliance_factory):
    appliance = appliance_factory({"web": {}}).start()
    url = f"http://127.0.0.1:{appliance.web_port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/openapi.json").status_code == 401
        basic = base64.b64encode(b"admin:admin").decode()
        answer = client.get(
            "/openapi.json", headers={"Authorization": f"Basic {basic}"}
        )
        assert answer.status_code == 401
    warnings = [
        line for line in appliance.log().splitlines() if "no web accounts" in line
    ]
    assert len(warnings) == 1
    assert "appliance web hash-password" in warnings[0]


def test_http_answers_as_soon_as_the_service_says_ready(appliance_factory):
    appliance = appliance_factory({"web": {}}).start()
    deadline = time.monotonic() + 120
    while "ready: serving DICOM" not in appliance.log():
        assert time.monotonic() < deadline, appliance.log()
        time.sleep(0.05)

    url = f"http://127.0.0.1:{appliance.web_port}"
    with httpx.Client(base_url=url, timeout=2) as client:
        assert client.get("/health").status_code == 200


def test_hash_password_prints_a_hash_that_verifies():
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "web", "hash-password"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        check=True,
    )
    line = result.stdout.strip()
    assert line.startswith('password_hash = "scrypt$')
    stored = line.split('"')[1]
    assert accounts.verify_password(stored, "correct horse")
    assert not accounts.verify_password(stored, "correct horsE")
    # Salted: the same password hashes differently each time.
    assert accounts.hash_password("x") != accounts.hash_password("x")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "role": "admin", "token_hash": "0" * 64}, "unknown role"),
        ({"name": "a", "role": "viewer", "password_hash": "md5$x"}, "malformed"),
        ({"name": "a", "role": "viewer", "token_hash": "xyz"}, "64 hexadecimal"),
        ({"name": "a", "role": "viewer"}, "needs a password_hash or a token_hash"),
        ({"name": "a:b", "role": "viewer", "token_hash": "0" * 64}, "name must"),
    ],
)
def test_config_check_reports_bad_accounts(tmp_path, entry, message):
    lines = ["[[web.accounts]]"]
    lines += [f"{key} = {config.toml_value(value)}" for key, value in entry.items()]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        config.load(path)
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "web.accounts: entry 0" in result.stderr
    assert message in result.stderr


def test_config_check_reports_a_name_listed_twice(tmp_path):
    entry = '[[web.accounts]]\nname = "a"\nrole = "viewer"\ntoken_hash = "{}"\n'
    path = tmp_path / "twice.toml"
    path.write_text(entry.format("0" * 64) + entry.format("1" * 64))
    with pytest.raises(ConfigError, match=r"entry 1 \('a'\): the name is listed twice"):
        config.load(path)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here for the test."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "web.pem", folder / "web.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_serves_https_with_the_configured_certificate(appliance_factory, tmp_path):
    cert_path, key_path = _self_signed(tmp_path)
    tls = {"tls_certificate": str(cert_path), "tls_key": str(key_path)}
    site = web_site.start(appliance_factory, {"web": tls})
    url = f"https://127.0.0.1:{site.appliance.web_port}"
    trusted = ssl.create_default_context(cafile=str(cert_path))
    with httpx.Client(base_url=url, verify=trusted, auth=VIEWER, timeout=60) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    log = site.appliance.log()
    assert f"HTTP listening on https://127.0.0.1:{site.appliance.web_port}" in log
    # The ready line names the protocol the port speaks.
    assert f", HTTPS on 127.0.0.1:{site.appliance.web_port}" in log


def test_an_unreadable_certificate_stops_the_start(appliance_factory, tmp_path):
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    appliance = appliance_factory({"web": {"tls_certificate": str(broken)}})
    appliance.write_config()
    result = appliance.cli("serve", check=False)
    assert result.returncode == 1
    assert "cannot use the TLS certificate" in result.stderr
    assert "web.tls_certificate" in result.stderr
