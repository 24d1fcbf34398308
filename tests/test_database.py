"""The example database: a local directory, or a Redis shared by many machines (against a real redis-server)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

import isolation_suite as iso
from isolation_suite.engine.check import search
from isolation_suite.cli import main
from isolation_suite.engine.database import DatabaseSpec, DatabaseSpecError, SharedDatabase, parse_spec, public_url
from isolation_suite.engine.profiles import register_profiles

sys.path.insert(0, str(Path(__file__).parent))
from redis_server import INSTALL_HINT, RedisServer, RedisServerError, free_port  # noqa: E402

#: a known-bad row the random search finds after a few examples (never on the first one for seed 3)
KNOWN_BAD = "restore_after_step"
WRITES = ("sadd", "srem", "del", "publish", "smove", "set", "expire")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free local port, no persistence; stopped after the test."""
    try:
        server = RedisServer(tmp_path / "redis-data").start()
    except RedisServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def env():
    """The environment and the profiles as a test leaves them are put back afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISOLATION_PROFILE", "isolation-dev")
        for name in ("ISOLATION_DATABASE", "ISOLATION_DATABASE_READONLY"):  # main(--database) sets them
            mp.delenv(name, raising=False)
        yield mp
    register_profiles()


def _search_in(env, folder: Path, database: str, seed: int, readonly: bool = False, max_examples: int = 30):
    """One machine: its own working directory (so its own local .hypothesis/examples), the given database."""
    folder.mkdir(parents=True, exist_ok=True)
    env.chdir(folder)
    env.setenv("ISOLATION_DATABASE", database)
    env.setenv("ISOLATION_DATABASE_READONLY", "1" if readonly else "0")
    register_profiles()
    return search(iso.catalog()[KNOWN_BAD], max_examples=max_examples, seed=seed, explicit=False, shrink=False)


def _local_entries(folder: Path, directory: str = ".hypothesis/examples") -> list[Path]:
    return [p for p in (folder / directory).rglob("*") if p.is_file()]


def _writes(server, names=WRITES) -> dict:
    """How often each of these commands reached the server (since its start or the last CONFIG RESETSTAT)."""
    stats = server.client().info("commandstats")
    return {name: stats[f"cmdstat_{name}"]["calls"] for name in names if f"cmdstat_{name}" in stats}


def _contents(server) -> dict:
    client = server.client()
    return {key: client.smembers(key) for key in client.keys("*")}


# --- specs -------------------------------------------------------------------------------------

def test_a_spec_is_a_directory_none_or_a_redis_url():
    assert parse_spec(".cache/db") == DatabaseSpec(directory=".cache/db")
    assert parse_spec("none") == DatabaseSpec(directory=None) and parse_spec(" OFF ").directory is None
    shared = parse_spec("redis://db.example:6379/2", readonly=True)
    assert shared.redis_url == "redis://db.example:6379/2" and shared.directory == ".hypothesis/examples"
    assert shared.describe() == ".hypothesis/examples + redis://db.example:6379/2 (read-only)"
    assert public_url("redis://:secret@h:1/0") == "redis://:***@h:1/0" and "secret" not in str(
        parse_spec("redis://u:secret@h:1/0").describe())


@pytest.mark.parametrize("url, needle", [
    ("redis://127.0.0.1:notaport/0", "the port must be a number"),
    ("redis://127.0.0.1:70000/0", "the port must be a number"),
    ("http://127.0.0.1:6379/0", "unsupported scheme 'http'"),
    ("redis://127.0.0.1:6379/zero", "the database must be a number"),
    ("redis://:6379/0", "no host"),
])
def test_a_malformed_redis_url_is_rejected(url, needle):
    with pytest.raises(DatabaseSpecError, match=needle):
        parse_spec(url)


def test_the_ci_profile_keeps_no_database_whatever_is_set(env, redis_server):
    env.setenv("ISOLATION_DATABASE", redis_server.url)
    register_profiles()
    assert settings.get_profile("isolation-ci").database is None
    assert settings.get_profile("isolation-dev").database.shared is not None
    env.setenv("ISOLATION_PROFILE", "isolation-ci")
    result = search(iso.catalog()[KNOWN_BAD], max_examples=5, explicit=False, shrink=False)
    assert result.database_ops == {} and _writes(redis_server, WRITES + ("smembers",)) == {}


def test_a_seeded_search_replays_the_failures_of_its_directory_database(env, tmp_path):
    first = _search_in(env, tmp_path / "one", "db", seed=1)
    assert first.failure is not None and _local_entries(tmp_path / "one", "db")  # kept, though the search was seeded
    again = _search_in(env, tmp_path / "one", "db", seed=3)
    assert again.first_failure_at == 1 and again.failure.scenario == first.failure.scenario


# --- sharing through a real Redis --------------------------------------------------------------

def test_a_failure_found_by_one_shard_is_replayed_first_by_another(env, tmp_path, redis_server):
    first = _search_in(env, tmp_path / "shard1", redis_server.url, seed=1)
    assert first.failure is not None and first.first_failure_at > 1
    assert first.database_ops["save"]["calls"] >= 1 and redis_server.client().dbsize() >= 1
    # another machine: an empty local directory, the same Redis, another seed
    second = _search_in(env, tmp_path / "shard2", redis_server.url, seed=3)
    assert second.first_failure_at == 1 and second.found_by == "search"
    assert second.failure.scenario == first.failure.scenario
    assert second.database_ops["fetch"]["calls"] >= 1 and not second.database_warning
    # without the shared store the same machine and seed start elsewhere
    alone = _search_in(env, tmp_path / "alone", "none", seed=3)
    assert (alone.failure is None or alone.first_failure_at > 1
            or alone.failure.scenario != first.failure.scenario)


def test_read_only_replays_shared_failures_and_never_writes_to_redis(env, tmp_path, redis_server):
    found = _search_in(env, tmp_path / "nightly", redis_server.url, seed=1)
    shared = _contents(redis_server)
    assert found.failure is not None and shared
    redis_server.client().config_resetstat()
    laptop = _search_in(env, tmp_path / "laptop", redis_server.url, seed=3, readonly=True)
    assert laptop.first_failure_at == 1 and laptop.failure.scenario == found.failure.scenario  # replayed
    assert _writes(redis_server) == {} and _contents(redis_server) == shared  # nothing written
    assert _local_entries(tmp_path / "laptop")  # the local directory stays writable
    # the same run without read-only does write: the check above can fail
    _search_in(env, tmp_path / "laptop", redis_server.url, seed=3)
    assert _writes(redis_server)


def test_redis_down_at_start_costs_one_warning_line_and_the_check_completes(env, tmp_path, capsys):
    env.chdir(tmp_path)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    code = main(["check", "functional_detach", "--devices", "cpu", "--max-examples", "5", "--seed", "1",
                 "--database", url, "--report-dir", "rep"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"example database .hypothesis/examples + {url}" in out and "gradient-flows     held" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"isolation-suite: warning: shared example database {url} "
                                                   "unavailable (ConnectionError"), err
    record = json.loads(next((tmp_path / "rep" / "results").glob("*.json")).read_text())
    assert record["database_warning"] in lines[0] and record["database_ops"]["skipped"]["calls"] >= 1
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["meta"]["database"].endswith(url)


def test_redis_killed_mid_run_costs_one_warning_and_failures_stay_local(env, tmp_path, redis_server, monkeypatch):
    calls = []
    answer = SharedDatabase._call

    def kill_after_the_first_call(self, op, run):  # between two database operations, not by timing
        calls.append(op)
        out = answer(self, op, run)
        if len(calls) == 1:
            redis_server.kill()
        return out

    monkeypatch.setattr(SharedDatabase, "_call", kill_after_the_first_call)
    result = _search_in(env, tmp_path / "shard", redis_server.url, seed=1)
    assert result.failure is not None and result.first_failure_at > 1  # the run went on to its verdict
    assert result.database_warning.startswith(f"shared example database {redis_server.url} unavailable")
    ops = result.database_ops
    assert calls[0] == "fetch" and ops["skipped"]["calls"] >= 1  # one answer, one error, then an empty store
    assert sum(ops[op]["calls"] for op in ("fetch", "save", "delete", "move")) == 2
    assert _local_entries(tmp_path / "shard")  # the failure is kept in the local directory


def test_fuzz_with_redis_down_says_so_once_and_passes(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from isolation_suite.cli import main; sys.exit(main())", "fuzz",
         "--techniques", "functional_detach,parametrize_where", "--profile", "isolation-dev", "--seed", "1",
         "--max-examples", "3", "--budget", "120", "--workers", "1", "--devices", "cpu", "--database", url,
         "--report-dir", "reports"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    warnings = [line for line in (run.stdout + run.stderr).splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"isolation-suite: warning: shared example database {url}")
    run_dir = tmp_path / "reports" / (tmp_path / "reports" / "LATEST").read_text().strip()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and all(r["database_warning"] for r in summary["results"])  # both items knew


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["check", "functional_detach"], ["fuzz", "--techniques", "functional_detach"]])
@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "ftp://127.0.0.1:6379/0"])
def test_a_bad_url_is_one_line_and_exit_2(env, tmp_path, capsys, command, url):
    env.chdir(tmp_path)
    assert main([*command, "--database", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "isolation-suite: error: database" in err
    assert not (tmp_path / "reports").exists()  # nothing started
    env.setenv("ISOLATION_DATABASE", url)  # the environment variable is checked the same way
    assert main(command) == 2 and "isolation-suite: error: database" in capsys.readouterr().err
    env.setenv("ISOLATION_DATABASE", "none")
    env.setenv("ISOLATION_DATABASE_READONLY", "maybe")
    assert main(command) == 2 and "ISOLATION_DATABASE_READONLY='maybe'" in capsys.readouterr().err


def test_the_plugin_rejects_a_bad_database_before_anything_runs(pytester):
    result = pytester.runpytest_subprocess("--isolation-technique", "functional_detach", "--isolation-devices", "cpu",
                                           "--isolation-database", "redis://127.0.0.1:x/0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["*database 'redis://127.0.0.1:x/0': the port must be a number*"])


def test_without_redis_server_the_fixture_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    with pytest.raises(RedisServerError) as raised:
        RedisServer(tmp_path / "data").start()
    assert str(raised.value) == INSTALL_HINT and "apt-get install" in INSTALL_HINT
