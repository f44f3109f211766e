"""`electron-serve tenants …` against the database and Redis a deployment configures."""

from __future__ import annotations

import re

import redis

from cluster.cli import main
from router.tenancy.sqldb import Database
from router.tenancy.store import TenantStore, revoked_keys_set
from tests.support.tenancy import REDIS_URL, postgres_schema, unique_prefix


def test_cli_adds_lists_and_revokes_keys_on_postgresql_and_redis(tmp_path, monkeypatch, capsys):
    prefix = unique_prefix()
    with postgres_schema() as url:
        monkeypatch.setenv("ELECTRON_TENANCY__DATABASE_URL", url)
        monkeypatch.setenv("ELECTRON_TENANCY__REDIS_URL", REDIS_URL)
        monkeypatch.setenv("ELECTRON_TENANCY__REDIS_PREFIX", prefix)
        assert main(["tenants", "add", "acme", "--plan", "standard", "--models", "electron"]) == 0
        added = capsys.readouterr().out
        key = re.search(r"key:\s+(es-\S+)", added).group(1)
        key_id = re.search(r"key id: (key_\w+)", added).group(1)
        assert main(["tenants", "add", "acme"]) == 1  # exists already
        assert "exists already" in capsys.readouterr().out
        assert main(["tenants", "list"]) == 0
        listed = capsys.readouterr().out
        assert "acme  plan=standard  models=electron" in listed and key_id in listed
        assert key not in listed

        db = Database(url, tmp_path / "unused.db")
        store = TenantStore(db, ["enterprise", "standard"])
        assert store.lookup(key)[0].allowed_models == ("electron",)
        assert main(["tenants", "revoke-key", key_id]) == 0
        assert store.lookup(key) is None
        db.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:  # running routers refuse it at once
            assert client.sismember(revoked_keys_set(prefix, "acme"), key_id)
        finally:
            client.delete(revoked_keys_set(prefix, "acme"))
            client.close()
