"""The HTTP server under ``appliance serve``: health, authentication, roles,
the access log, configuration checks and the OpenAPI description."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.web import accounts
from appliance.web.app import routes
from appliance.web.auth import PUBLIC, role_of
from appliance.web.openapi import PATHS
from tests import web_site
from tests.web_site import VIEWER, VIEWER_TOKEN


@pytest.fixture
def site(appliance_factory):
    return web_site.start(appliance_factory)


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
    second = appliance_factory(name="second")
    second.web_port = first.appliance.web_port
    second.write_config()
    result = second.cli("serve", check=False)
    assert result.returncode == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{second.web_port}" in result.stderr


def test_without_accounts_only_health_answers(appliance_factory):
    appliance = appliance_factory().start()
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
