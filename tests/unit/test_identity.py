"""Identity hygiene (issue 13, finding 12): tenant ids, admin-set cache salts, pools, the
deployment's own tenant names, and settings from the environment taken as they were written."""

from __future__ import annotations

import pytest

from core.config import load_config
from router.tenancy.sqldb import Database
from router.tenancy.store import TenantError, TenantStore

CONFIG = load_config(env={}, overrides={
    "auth": {"static_tenant": "local"},
    "cluster": {"pool": "default"},
    "autoscaler": {"pools": [{"name": "acme", "min_workers": 1, "max_workers": 2}]}})


@pytest.fixture
def store(tmp_path):
    db = Database(None, tmp_path / "t.db")
    db.migrate()
    yield TenantStore.for_config(db, CONFIG)
    db.close()


def refused(store: TenantStore, param: str, tenant_id: str = "bob", **fields) -> None:
    with pytest.raises(TenantError) as caught:
        store.add_tenant(tenant_id, "standard", **fields)
    assert caught.value.param == param
    assert store.get_tenant(tenant_id) is None


def test_a_tenant_id_with_a_trailing_newline_is_refused(store):
    refused(store, "tenant_id", tenant_id="acme\n")
    refused(store, "tenant_id", tenant_id="a b")
    assert store.add_tenant("acme.eu-1", "standard")[0].tenant_id == "acme.eu-1"


@pytest.mark.parametrize("tenant_id", ["local", "admin", "anonymous"])
def test_the_deployments_own_tenant_ids_are_reserved(store, tenant_id):
    refused(store, "tenant_id", tenant_id=tenant_id)


@pytest.mark.parametrize("salt", ["tenant:alice", "a|b", "", "x" * 65, "sp ace", "nul\x00"])
def test_a_cache_salt_that_could_read_another_tenants_cache_is_refused(store, salt):
    refused(store, "cache_salt", cache_salt=salt)


def test_a_shared_salt_is_allowed(store):
    tenant, _ = store.add_tenant("bob", "standard", cache_salt="shared")
    assert tenant.effective_salt == "shared"


def test_an_unknown_pool_is_refused_at_creation(store):
    refused(store, "pool", pool="nowhere")
    assert store.add_tenant("bob", "standard", pool="acme")[0].pool == "acme"
    assert store.add_tenant("carol", "standard", pool="default")[0].pool == "default"


def test_text_settings_from_the_environment_are_taken_as_written():
    config = load_config(env={"ELECTRON_AUTH__ADMIN_KEY": "sk-x #y",
                              "ELECTRON_AUTH__STATIC_TENANT": "~",
                              "ELECTRON_ROUTER__POLICY": "least_load",
                              "ELECTRON_ROUTER__PORT": "9001",
                              "ELECTRON_AUTH__STATIC_KEYS": "[a, b]",
                              "ELECTRON_AUTH__ENABLED": "false"})
    assert config.auth.admin_key == "sk-x #y"   # YAML would have cut the comment
    assert config.auth.static_tenant == "~"     # YAML would have read none
    assert config.router.policy == "least_load"
    assert config.router.port == 9001 and config.auth.static_keys == ("a", "b")
    assert config.auth.enabled is False
