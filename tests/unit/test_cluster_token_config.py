"""Where the cluster token comes from: the config (validated, read from the environment as
text, never shown in a repr), one made per run by `electron-serve up`, and required by the
`worker` and `router` commands that join a cluster."""

from __future__ import annotations

import asyncio

import pytest

from cluster import launcher
from core.cluster_token import new_cluster_token, token_matches
from core.config import ConfigError, load_config

TOKEN = "s3cret-cluster-token#~x"  # '#' and '~' would be eaten if read as YAML


def test_the_token_is_read_from_the_environment_as_text():
    config = load_config(env={"ELECTRON_CLUSTER__TOKEN": TOKEN})
    assert config.cluster.token == TOKEN


@pytest.mark.parametrize("bad", ["short", "with a space in it ok", "tab\tinside-the-token",
                                 "non-ascii-tökenvalue-x"])
def test_a_token_unfit_for_grpc_metadata_or_too_short_is_refused(bad):
    with pytest.raises(ConfigError, match="token"):
        load_config(env={"ELECTRON_CLUSTER__TOKEN": bad})


def test_the_token_is_not_shown_in_the_configs_repr():
    config = load_config(env={"ELECTRON_CLUSTER__TOKEN": TOKEN})
    assert TOKEN not in repr(config) and TOKEN not in str(config.cluster)


def test_up_makes_a_token_per_run_and_keeps_a_configured_one():
    unset = load_config(env={})
    assert unset.cluster.token is None
    first = launcher.with_cluster_token(unset).cluster.token
    second = launcher.with_cluster_token(unset).cluster.token
    assert first and second and first != second
    assert len(first) >= 32
    # The config the workers get (JSON, as the actor receives it) carries it too.
    made = launcher.with_cluster_token(unset)
    assert first not in made.model_dump_json()
    assert made.cluster.token in made.model_dump_json()
    configured = load_config(env={"ELECTRON_CLUSTER__TOKEN": TOKEN})
    assert launcher.with_cluster_token(configured).cluster.token == TOKEN


@pytest.mark.parametrize("command", [launcher.run_worker, launcher.run_router])
def test_joining_a_cluster_without_a_token_is_a_config_error(command):
    config = load_config(env={}, overrides={"cluster": {"ray_address": "127.0.0.1:1"}})
    with pytest.raises(ConfigError, match="ELECTRON_CLUSTER__TOKEN"):
        asyncio.run(command(config))


def test_tokens_compare_whole():
    token = new_cluster_token()
    assert token_matches(token, token) and token_matches(token.encode(), token)
    for other in (None, "", token[:-1], token + "x", token.upper() if token.upper() != token
                  else token + "y"):
        assert not token_matches(other, token)
