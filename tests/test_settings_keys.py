"""Settings precedence and validation; API keys and their command."""

from __future__ import annotations

import pytest

from kiln.cli.main import main
from kiln.keys import KeyStore, RateLimiter
from kiln.settings import SettingsError, load_settings


def test_precedence_flags_over_env_over_file(tmp_path):
    config = tmp_path / "kiln.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\nsync_wait_s = 1.5\n')
    env = {"KILN_PORT": "9100", "KILN_CONFIG": str(config)}
    settings = load_settings({"port": None}, environ=env)
    assert (settings.port, settings.host, settings.sync_wait_s) == (9100, "0.0.0.0", 1.5)
    assert load_settings({"port": 9200}, environ=env).port == 9200
    assert load_settings(environ={}).port == 8080


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(environ={"KILN_PORT": "abc"}), "KILN_PORT=abc"),
    (dict(flags={"port": 70000}, environ={}), "--port 70000"),
    (dict(environ={"KILN_PUBLIC_URL": "ftp://x"}), "KILN_PUBLIC_URL=ftp://x: Value error, must start with http"),
    (dict(environ={"KILN_AUTH": "maybe"}), "KILN_AUTH=maybe"),
])
def test_bad_settings_name_their_source(kwargs, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load_settings(**kwargs)


def test_unknown_key_in_the_settings_file(tmp_path):
    config = tmp_path / "kiln.toml"
    config.write_text("prot = 9000\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings(config_file=config, environ={})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(config_file=tmp_path / "missing.toml", environ={})


def test_keys_are_stored_hashed_and_checked(tmp_path):
    store = KeyStore(tmp_path / "k.db")
    new = store.create("a", credits=1)
    assert new.secret.startswith("kiln_sk_") and store.lookup(new.secret).id == new.record.id
    assert new.secret not in (tmp_path / "k.db").read_bytes().decode("latin-1")
    assert store.lookup(new.secret[:-1] + ("A" if new.secret[-1] != "A" else "B")) is None
    assert store.spend(new.record.id) and not store.spend(new.record.id)
    store.refund(new.record.id)
    assert store.spend(new.record.id)
    assert store.revoke(new.record.id) and not store.lookup(new.secret).active(store.clock())


def test_rate_window_slides():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.hit("k", 2).allowed for _ in range(3)] == [True, True, False]
    now[0] = 59.0
    assert not limiter.hit("k", 2).allowed
    now[0] = 60.5
    state = limiter.hit("k", 2)
    assert state.allowed and state.remaining == 1


def test_keys_command(tmp_path, capsys):
    data = str(tmp_path / "data")
    assert main(["keys", "create", "--name", "ci", "--rate", "5", "--credits", "10", "--data-dir", data]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    secret = out[-1]
    assert secret.startswith("kiln_sk_") and "webhook secret whsec_" in out[-2]
    key_id = out[0].split()[1]
    assert main(["keys", "list", "--data-dir", data]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and secret not in listing and "5/min" in listing and "credits 10" in listing
    assert main(["keys", "revoke", key_id, "--data-dir", data]) == 0
    assert main(["keys", "revoke", key_id, "--data-dir", data]) == 2
    assert "revoked" in (capsys.readouterr().out + "") and main(["keys", "create", "--rate", "0", "--data-dir", data]) == 2


@pytest.mark.parametrize(("host", "url"), [("0.0.0.0", "http://127.0.0.1:8080"), ("::", "http://[::1]:8080"),
                                           ("10.1.2.3", "http://10.1.2.3:8080"), ("fe80::1", "http://[fe80::1]:8080")])
def test_base_url_never_hands_out_a_wildcard_address(host, url):
    assert load_settings({"host": host}, environ={}).base_url() == url
    assert load_settings({"host": host, "public_url": "https://kiln.example/"}, environ={}).base_url() == "https://kiln.example"


def test_keys_create_bounds_and_zero_credits(tmp_path, capsys):
    data = str(tmp_path / "d")
    assert main(["keys", "create", "--credits", "0", "--data-dir", data]) == 0
    assert "credits 0" in capsys.readouterr().out
    assert main(["keys", "create", "--rate", str(10**20), "--data-dir", data]) == 2
