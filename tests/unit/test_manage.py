"""``cellagent-manage``: db sync/version and the top's cell records, run in-process."""

import pytest

from cellagent import objects
from cellagent.cmd import manage
from cellagent.state import sql
from cellagent.state import top

URL = "rabbit://bob:s3cr3tpw@broker-aws:5672/cells"


@pytest.fixture
def env(tmp_path):
    """A config file whose database is a SQLite file under tmp_path."""
    db = tmp_path / "state" / "cellagent.sqlite"
    conf = tmp_path / "cellagent.conf"
    conf.write_text("[DEFAULT]\nstate_path = %s\nlog_file = %s\nuse_stderr = false\n"
                    "[database]\nconnection = sqlite:///%s\n"
                    % (tmp_path / "state", tmp_path / "manage.log", db))
    return {"conf": str(conf), "url": "sqlite:///%s" % db, "tmp": tmp_path}


@pytest.fixture
def run(env, capsys):
    def run(*args):
        code = manage.main(["--config-file", env["conf"], *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def top_store(env):
    stores = []

    def open_store():
        store = top.TopStore(env["url"])
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        store.close()


def _one_line_error(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cellagent-manage: ")
    for word in words:
        assert word in lines[0]


# -- db ---------------------------------------------------------------------

def test_db_sync_creates_both_schemas(run, env, top_store):
    code, out, _ = run("db", "sync")
    assert code == 0
    assert out.splitlines() == ["schema version 0 -> %d" % sql.SCHEMA_VERSION,
                                "top schema version 0 -> %d" % top.TOP_SCHEMA_VERSION]
    top_store().check_schema()
    child = sql.SqlStore(env["url"])
    try:
        child.check_schema()
    finally:
        child.close()
    code, out, _ = run("db", "sync")
    assert code == 0 and out.splitlines() == [
        "schema version 1 -> 1", "top schema version 1 -> 1"]


def test_db_version(run):
    code, out, _ = run("db", "version")
    assert code == 0 and out.splitlines() == ["schema version 0", "top schema version 0"]
    run("db", "sync")
    code, out, _ = run("db", "version")
    assert out.splitlines() == ["schema version 1", "top schema version 1"]


def test_db_sync_upgrades_only_the_missing_schema(run, env):
    child = sql.SqlStore(env["url"])
    try:
        child.sync_schema()
    finally:
        child.close()
    code, out, _ = run("db", "sync")
    assert code == 0
    assert out.splitlines() == ["schema version 1 -> 1", "top schema version 0 -> 1"]


def test_db_sync_refuses_a_newer_top_schema(run, top_store):
    run("db", "sync")
    with top_store()._engine.begin() as conn:
        conn.execute(top.SCHEMA_VERSION_TABLE.update().values(version=99))
    code, _, err = run("db", "sync")
    assert code == 1
    _one_line_error(err, "99")


def test_db_sync_memory_has_no_top(tmp_path, capsys):
    conf = tmp_path / "c.conf"
    conf.write_text("[DEFAULT]\nlog_file = %s\nuse_stderr = false\n"
                    "[database]\nconnection = memory://\n" % (tmp_path / "log"))
    assert manage.main(["--config-file", str(conf), "db", "sync"]) == 0
    assert capsys.readouterr().out.splitlines() == ["schema version 1 -> 1"]


# -- cell -------------------------------------------------------------------

def _create(run, name="aws", *extra):
    return run("cell", "create", name, "--transport-url", URL, *extra)


def test_cell_create_with_every_option(run, top_store):
    code, out, err = _create(
        run, "aws", "--tier", "public", "--cost-per-vcpu-hour", "0.05",
        "--flavor-cost", "m1.small=0.02", "--flavor-cost", "m1.large=0.4",
        "--weight-offset", "-2.5", "--weight-scale", "3", "--max-instances", "50",
        "--max-vcpus", "100", "--max-cost-per-hour", "12.5", "--disable")
    assert code == 0, err
    assert "s3cr3tpw" not in out and "bob:***@broker-aws" in out
    assert top_store().get_cell("aws") == objects.TopCell(
        name="aws", transport_url=URL, is_parent=False, weight_offset=-2.5,
        weight_scale=3.0, tier="public", cost_per_vcpu_hour=0.05,
        flavor_costs={"m1.small": 0.02, "m1.large": 0.4}, max_instances=50,
        max_vcpus=100, max_cost_per_hour=12.5, disabled=True)


def test_cell_create_defaults_and_parent(run, top_store):
    assert _create(run, "priv")[0] == 0
    assert top_store().get_cell("priv") == objects.TopCell("priv", URL)
    assert _create(run, "up", "--parent")[0] == 0
    assert top_store().get_cell("up").is_parent is True


def test_cell_create_needs_no_db_sync(run, top_store):
    # An empty database gets the top's tables on first use, as the agent does.
    assert _create(run)[0] == 0
    assert top_store().schema_version() == top.TOP_SCHEMA_VERSION


@pytest.mark.parametrize("args, words", [
    (("--tier", "cheap"), ("tier", "cheap")),
    (("--max-instances", "2.5"), ("--max-instances", "integer")),
    (("--cost-per-vcpu-hour", "lots"), ("--cost-per-vcpu-hour", "number")),
    (("--max-vcpus", "-1"), ("max_vcpus", "negative")),
    (("--flavor-cost", "m1.small"), ("FLAVOR=COST",)),
    (("--flavor-cost", "m1.small=x"), ("flavor-cost",)),
])
def test_cell_create_bad_values(run, top_store, args, words):
    code, out, err = _create(run, "aws", *args)
    assert code == 1
    _one_line_error(err, "aws", *words)
    assert top_store().list_cells() == []


def test_cell_create_bad_name(run, top_store):
    code, _, err = _create(run, "a!b")
    assert code == 1
    _one_line_error(err, "a!b")


def test_cell_create_without_transport_url(run, top_store):
    code, _, err = run("cell", "create", "aws")
    assert code == 1
    _one_line_error(err, "--transport-url")
    code, _, err = run("cell", "create", "aws", "--transport-url", " ")
    assert code == 1
    _one_line_error(err, "--transport-url")
    assert top_store().list_cells() == []


def test_cell_create_existing(run, top_store):
    _create(run, "aws", "--tier", "public")
    code, _, err = _create(run, "aws")
    assert code == 1
    _one_line_error(err, "aws", "already exists")
    assert top_store().get_cell("aws").tier == "public"


def test_cell_update_changes_only_given_fields(run, top_store):
    _create(run, "aws", "--tier", "public", "--cost-per-vcpu-hour", "0.05",
            "--flavor-cost", "m1.small=0.02", "--flavor-cost", "m1.large=0.4",
            "--max-instances", "50", "--max-vcpus", "100", "--weight-offset", "1")
    before = top_store().get_cell("aws")
    code, out, err = run("cell", "update", "aws", "--disable", "--max-instances", "none",
                         "--flavor-cost", "m1.small=none", "--flavor-cost", "m1.xl=1.5")
    assert code == 0, err
    after = top_store().get_cell("aws")
    assert after == objects.TopCell(
        name="aws", transport_url=URL, is_parent=False, weight_offset=1.0, weight_scale=1.0,
        tier="public", cost_per_vcpu_hour=0.05, flavor_costs={"m1.large": 0.4, "m1.xl": 1.5},
        max_instances=None, max_vcpus=100, max_cost_per_hour=None, disabled=True)
    assert (after.transport_url, after.max_vcpus) == (before.transport_url, before.max_vcpus)
    code, _, _ = run("cell", "update", "aws", "--enable", "--transport-url", "rabbit://new/",
                     "--tier", "private", "--parent")
    assert code == 0
    after = top_store().get_cell("aws")
    assert (after.disabled, after.transport_url, after.tier, after.is_parent) == (
        False, "rabbit://new/", "private", True)
    assert after.flavor_costs == {"m1.large": 0.4, "m1.xl": 1.5}
    assert run("cell", "update", "aws", "--child")[0] == 0
    assert top_store().get_cell("aws").is_parent is False


def test_cell_update_errors(run, top_store):
    code, _, err = run("cell", "update", "nope", "--disable")
    assert code == 1
    _one_line_error(err, "nope")
    _create(run, "aws")
    code, _, err = run("cell", "update", "aws")
    assert code == 1
    _one_line_error(err, "nothing to change")
    code, _, err = run("cell", "update", "aws", "--weight-scale", "x")
    assert code == 1
    _one_line_error(err, "aws", "--weight-scale")
    assert top_store().get_cell("aws") == objects.TopCell("aws", URL)


def test_cell_list_masks_passwords(run):
    code, out, _ = run("cell", "list")
    assert code == 0 and out.splitlines()[0].split()[0] == "NAME"
    assert len(out.splitlines()) == 1
    _create(run, "zeta", "--tier", "public", "--max-instances", "5")
    _create(run, "alpha", "--disable")
    code, out, _ = run("cell", "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["NAME", "alpha", "zeta"]
    assert "s3cr3tpw" not in out
    assert lines[1].split() == ["alpha", "private", "child", "disabled", "0", "-", "-", "-",
                                "rabbit://bob:***@broker-aws:5672/cells"]
    assert lines[2].split()[:6] == ["zeta", "public", "child", "enabled", "0", "5"]


def test_cell_show(run, top_store):
    _create(run, "aws", "--flavor-cost", "m1.small=0.5")
    code, out, _ = run("cell", "show", "aws")
    assert code == 0
    assert "s3cr3tpw" not in out and "bob:***@" in out
    assert '{"m1.small": 0.5}' in out
    assert "last_seen" not in out
    top_store().save_capacities("aws", {}, top.to_naive_utc("2024-05-01T12:00:00Z"))
    code, out, _ = run("cell", "show", "aws")
    assert "2024-05-01 12:00:00" in out and "failures" in out
    code, _, err = run("cell", "show", "nope")
    assert code == 1
    _one_line_error(err, "nope")


def test_cell_delete(run, top_store):
    _create(run, "aws")
    top_store().save_capacities("aws", {}, top.to_naive_utc("2024-05-01T12:00:00"))
    code, out, _ = run("cell", "delete", "aws")
    assert code == 0 and "aws" in out
    store = top_store()
    assert store.list_cells() == [] and store.cell_reports() == {}
    code, _, err = run("cell", "delete", "aws")
    assert code == 1
    _one_line_error(err, "aws")


def test_cell_on_a_newer_top_schema(run, top_store):
    run("db", "sync")
    with top_store()._engine.begin() as conn:
        conn.execute(top.SCHEMA_VERSION_TABLE.update().values(version=99))
    code, _, err = run("cell", "list")
    assert code == 1
    _one_line_error(err, "db sync")
