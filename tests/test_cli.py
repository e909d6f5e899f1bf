"""The command line: usage errors, list/env on CPU, sweep, wheelhouse plan, papermill reruns."""

import json
import os
import subprocess
import sys

import pytest

from lib import catalog
from lib import ROOT
from lib.harness import results as R
from lib.__main__ import main
from lib.tools.wheelhouse import platform_tags


def cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lib", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,match", [
    (["sweep", "seltest"], "unknown experiment 'seltest'; did you mean 'selftest'"),
    (["sweep", "selftest", "-p", "variants=a"], "unknown parameter 'variants' for experiment 'selftest'; did you mean 'variant'"),
    (["sweep", "selftest", "-p", "n=two"], "n='two' is not a valid int"),
    (["sweep", "selftest", "--shard", "2/2"], "shard index must be in 0..1"),
    (["sweep", "selftest", "--shard", "x"], "shard must look like i/n"),
    (["sweep", "selftest", "--devices", "0,0"], "devices"),
    (["list", "nope"], "unknown experiment 'nope'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert err.count("\n") == 1


def test_usage_error_in_a_real_process():
    r = cli("sweep", "seltest")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: unknown experiment 'seltest'; did you mean 'selftest'")


def test_list_and_env_run_without_a_gpu():
    r = cli("list")
    assert r.returncode == 0, r.stderr
    assert "selftest  (16 points, CPU)" in r.stdout and "variant = a,b" in r.stdout
    r = cli("env")
    assert r.returncode == 0, r.stderr
    assert "gpu " in r.stdout and "missing" in r.stdout and "papermill" in r.stdout
    r = cli("env", "--json")
    rep = json.loads(r.stdout)
    assert set(rep) >= {"gpu", "libraries", "missing", "git"}
    assert rep["libraries"]["pandas"]


def test_sweep_from_the_command_line(tmp_path, capsys):
    assert main(["sweep", "selftest", "-p", "sleep_s=0", "-p", "n=1,2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "measured 4 points (4 rows, 0 errors)" in capsys.readouterr().out
    assert len(R.load("selftest", root=tmp_path)) == 4
    assert main(["sweep", "selftest", "-p", "sleep_s=0", "--shard", "0/2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["merge", "selftest", "--out", str(tmp_path)]) == 0
    assert "merged" in capsys.readouterr().out
    assert R.sibling_parts(R.csv_path("selftest", "cpu", root=tmp_path)) == []


def test_wheelhouse_plan_targets_the_chosen_python_and_platform(capsys):
    assert main(["wheelhouse", "--dry-run", "--python-version", "3.12", "--dest", "/tmp/wh-plan"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in cmd
    for pkg in ("papermill>=2.6", "jupytext>=1.16", "nbclient", "ipykernel>=6.29", "jupyter-book==1.0.4.post1"):
        assert pkg in cmd
    assert not os.path.exists("/tmp/wh-plan")


def test_platform_tags_include_older_glibc():
    tags = platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert "manylinux2014_x86_64" in tags and "manylinux_2_29_x86_64" not in tags
    assert platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


def test_vllm_kernel_delegates(capsys):
    rc = main(["vllm-kernel", "--status"])
    assert rc == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_reproduce_rejects_unknown_chapter_parameter(capsys):
    assert main(["reproduce", "seed", "--mode", "replay", "-p", "tabels", "1", "--no-build"]) == 2
    assert "declared by none" in capsys.readouterr().err


def _outputs(nb):
    """Code-cell outputs without counters: what a reader of the executed chapter sees."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", []):
            out.append([{k: v for k, v in o.items() if k != "execution_count"} for o in cell.get("outputs", [])])
    return out


def test_papermill_rerun_in_replay_mode_with_a_changed_parameter_changes_the_output(tmp_path):
    a, b = tmp_path / "default", tmp_path / "one-table"
    r = cli("reproduce", "chapters/seed.md", "--mode", "replay", "--no-build", "--no-progress", "--out", str(a))
    assert r.returncode == 0, r.stderr
    r = cli("reproduce", "seed", "--mode", "replay", "-p", "tables", "1", "--no-build", "--no-progress", "--out", str(b))
    assert r.returncode == 0, r.stderr
    nbformat = pytest.importorskip("nbformat")  # book extra; absent on bare GPU nodes
    nb_a = nbformat.read(a / "seed.ipynb", as_version=4)
    nb_b = nbformat.read(b / "seed.ipynb", as_version=4)
    injected = [c.source for c in nb_b.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'tables = "1"' in injected[0] and 'mode = "replay"' in injected[0]
    assert _outputs(nb_a) != _outputs(nb_b)
    assert not list(a.glob("*.source.ipynb"))  # only the executed notebook stays
    # the executed notebooks live outside the source tree
    assert not list((ROOT / "chapters").glob("*.ipynb"))


def test_reproduce_picks_registered_chapters_in_book_order(monkeypatch):
    import dataclasses

    from lib.__main__ import experiment_chapters

    base = catalog.EXPERIMENTS["selftest"]
    for name, chapter in [("t-about", "chapters/about"), ("t-seed", "chapters/seed.md"), ("t-gone", "chapters/gone.md")]:
        monkeypatch.setitem(catalog.EXPERIMENTS, name, dataclasses.replace(base, name=name, chapter=chapter))
    picked = [p.relative_to(ROOT).as_posix() for p in experiment_chapters()]
    ours = {"chapters/seed.md", "chapters/about.md", "chapters/gone.md"}
    assert [p for p in picked if p in ours] == ["chapters/seed.md", "chapters/about.md"]


def test_chapter_parameters_keep_the_type_of_their_default():
    from lib.tools.reproduce import coerce_param

    assert coerce_param("1,2", "1,2,3") == "1,2"
    assert coerce_param("1", "1,2,3") == "1"
    assert coerce_param("2048", 4096) == 2048
    assert coerce_param("0.5", 1.0) == 0.5
    assert coerce_param("false", True) is False
    with pytest.raises(ValueError):
        coerce_param("many", 4096)


def test_one_param_syntax_for_sweep_and_reproduce_with_the_old_one_as_alias():
    from lib.__main__ import _parser, param_alias
    from lib.tools.reproduce import parse_params

    assert param_alias(["reproduce", "seed", "-p", "tables", "1", "--no-build"]) == \
        ["reproduce", "seed", "-p", "tables=1", "--no-build"]
    assert param_alias(["sweep", "x", "-p", "n=1,2", "-p", "seed", "-1"]) == ["sweep", "x", "-p", "n=1,2", "-p", "seed=-1"]
    assert param_alias(["sweep", "x", "-p", "n", "--force"]) == ["sweep", "x", "-p", "n", "--force"]  # left for the error
    for argv in (["reproduce", "seed", "-p", "tables=1"], ["reproduce", "seed", "-p", "tables", "1"]):
        args = _parser().parse_args(param_alias(argv))
        assert parse_params(args.param) == [("tables", "1")]
    args = _parser().parse_args(param_alias(["sweep", "selftest", "-p", "n", "1,2"]))
    assert args.param == ["n=1,2"]
    assert parse_params([("a", "1"), "b=2"]) == [("a", "1"), ("b", "2")]  # the library API takes both
    with pytest.raises(ValueError, match="name=value"):
        parse_params(["tables"])


def test_reproduce_takes_k_equals_v_like_sweep(capsys):
    assert main(["reproduce", "seed", "--mode", "replay", "-p", "tabels=1", "--no-build"]) == 2
    assert "declared by none" in capsys.readouterr().err  # parsed as a name and a value


def test_sweep_takes_the_alias_too(tmp_path, capsys):
    assert main(["sweep", "selftest", "-p", "sleep_s", "0", "-p", "n", "1", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert "measured 2 points" in capsys.readouterr().out
    assert main(["sweep", "selftest", "-p", "sleep_s=0", "-p", "n=1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "replayed" in out and "--force" in out


def test_reproduce_force_sets_the_frames_variable_without_a_declared_parameter(monkeypatch, tmp_path):
    """-p force=1 is understood by every chapter: mode = "run" then measures afresh."""
    pytest.importorskip("papermill")
    from lib.book.frame import FORCE_ENV
    from lib.tools import reproduce as P

    monkeypatch.delenv(FORCE_ENV, raising=False)
    assert P.FORCE_ENV == FORCE_ENV
    seen = {}
    monkeypatch.setattr("papermill.execute_notebook",
                        lambda *a, parameters=None, **k: seen.update(parameters=parameters, env=__import__("os").environ.get(FORCE_ENV)))
    try:
        rc = P.reproduce([P.chapter_path("seed")], [("force", "1")], mode="replay", out=str(tmp_path),
                         build=False, progress=False)
    finally:
        env = __import__("os").environ.pop(FORCE_ENV, None)
    assert rc == 0 and seen["env"] == env == "1" and "force" not in seen["parameters"]


def test_wheelhouse_sweeps_only_brings_what_a_measuring_node_needs(capsys):
    assert main(["wheelhouse", "--dry-run", "--sweeps-only", "--dest", "/tmp/wh-plan"]) == 0
    cmd = capsys.readouterr().out.split()
    assert "tqdm>=4.66" in cmd
    for pkg in ("papermill>=2.6", "ipykernel>=6.29", "jupyter-book==1.0.4.post1"):
        assert pkg not in cmd
