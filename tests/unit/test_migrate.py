"""`electron-serve migrate` (the Helm chart's pre-install/pre-upgrade hook Job) and
`tenancy.migrate_on_start`: a deployment that migrates once per release keeps its routers
from migrating at start."""

from __future__ import annotations

import sqlite3

from cluster.cli import _parser, main
from core.config import load_config
from router.tenancy.admission import Tenancy


def _versions(path) -> set[int]:
    with sqlite3.connect(path) as conn:
        return {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}


def test_migrate_applies_the_schema_once_and_is_idempotent(tmp_path, monkeypatch, capsys):
    path = tmp_path / "electron.db"
    monkeypatch.setenv("ELECTRON_TENANCY__SQLITE_PATH", str(path))
    assert _parser().parse_args(["migrate", "--config", "c.yaml"]).command == "migrate"
    assert main(["migrate"]) == 0
    applied = _versions(path)
    assert applied and main(["migrate"]) == 0 and _versions(path) == applied
    assert "sqlite schema at version" in capsys.readouterr().out


def test_migrate_fails_clearly_when_the_database_is_down(monkeypatch, capsys):
    monkeypatch.setenv("ELECTRON_TENANCY__DATABASE_URL",
                       "postgresql://u:p@127.0.0.1:1/electron")
    assert main(["migrate"]) == 1
    assert "database is unavailable" in capsys.readouterr().err


async def test_routers_migrate_at_start_only_when_asked(tmp_path):
    for migrate, expected in ((True, True), (False, False)):
        path = tmp_path / f"{migrate}.db"
        config = load_config(env={}, overrides={"tenancy": {
            "sqlite_path": str(path), "spool_path": str(tmp_path / f"{migrate}.jsonl"),
            "migrate_on_start": migrate}})
        tenancy = Tenancy(config, pool=None)
        await tenancy.start()
        await tenancy.stop()
        exists = path.exists() and bool(sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE name='schema_migrations'").fetchall())
        assert exists is expected
    assert load_config(env={}).tenancy.migrate_on_start is True  # the embedded default
