"""`precondtune tune`: search spaces, divergence, resume after a kill, and bad input (exit 2, nothing written)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import EXAMPLES
from optuna.distributions import CategoricalDistribution
from optuna.trial import FixedTrial, TrialState
from typer.testing import CliRunner

import precondtune.optim as po
from precondtune.cli import app
from precondtune.errors import ConfigError
from precondtune.modelfile import load_model_file
from precondtune.search import (
    AdamWReference,
    SearchSettings,
    _jsonable,
    config_from_dict,
    discover_knobs,
    run_search,
)

optuna.logging.set_verbosity(optuna.logging.ERROR)

OVERFLOWING_MODEL = textwrap.dedent('''
    """A tiny regression whose loss overflows at large learning rates."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    _W = torch.randn(8, 1, generator=torch.Generator().manual_seed(3))

    def build_model():
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def sample_batch(batch_size):
        x = torch.randn(batch_size, 8)
        return x, x @ _W

    def loss_fn(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)
''')


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(OVERFLOWING_MODEL)
    return path


def _draws(knobs, rng, n=6):
    """All-low, all-high and random points of a search space's distributions."""
    def pick(d, how):
        if isinstance(d, CategoricalDistribution):
            return d.choices[0] if how == "low" else d.choices[-1] if how == "high" else rng.choice(d.choices)
        if how in ("low", "high"):
            return getattr(d, how)
        if getattr(d, "log", False):
            v = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
        else:
            v = rng.uniform(d.low, d.high)
        return round(v) if isinstance(d.low, int) and not isinstance(d.low, float) else v

    for how in ["low", "high"] + ["random"] * n:
        yield {name: pick(d, how) for name, d in knobs.items()}


@pytest.mark.parametrize("name", po.available())
def test_every_sampled_config_validates_and_round_trips(name):
    spec = po.get_spec(name)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    rng = random.Random(0)
    base = spec.from_adamw(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1).config
    for b in (None, base):
        knobs = discover_knobs(spec, b)
        assert "lr" in knobs, f"{name}: the search space must search the learning rate"
        if b is not None:  # centred on the transferred lr
            assert knobs["lr"].low < b.lr < knobs["lr"].high
        for params in _draws(knobs, rng):
            config = spec.search_space(FixedTrial(params), b)
            assert isinstance(config, spec.config_cls)
            stored = json.loads(json.dumps(_jsonable(po.config_dict(config))))
            assert config_from_dict(spec, stored) == config  # the best config is rebuilt exactly
            po.build(name, model, **po.config_dict(config))


def test_diverging_trials_are_pruned_with_reasons_and_the_best_is_finite(tiny_model):
    mf = load_model_file(tiny_model)
    # a "tuned AdamW" lr of 3 centres the search on [0.3, 30]: most trials blow up; the enqueued defaults do not
    settings = SearchSettings(optimizer="adamw", trials=6, steps=15, batch_size=16, storage="memory",
                              adamw=AdamWReference(lr=3.0), pruner="none")
    r = run_search(mf, settings)
    frame = r.frame
    diverged = frame[(frame["state"] == "PRUNED") & frame["reason"].str.startswith("diverged")]
    assert len(diverged) >= 2, frame[["state", "reason", "lr"]]
    assert r.counts["failed"] == 0 and r.new["complete"] + r.new["pruned"] == 6
    assert r.best_value is not None and math.isfinite(r.best_value)
    assert all(math.isfinite(v) for v in frame[frame["state"] == "COMPLETE"]["value"])
    assert r.steps_saved_by_pruning > 0


def _cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-c", "from precondtune.cli import main; main()", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _complete(url, name):
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return {}
    return {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}


def test_a_killed_study_resumes_with_nothing_lost(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ["tune", str(tiny_model), "-o", "adamw", "--steps", "25", "--batch-size", "16", "--storage", url,
            "--study-name", "s", "--pruner", "none", "--json"]
    proc = _cli(*args, "--trials", "500", cwd=tmp_path)
    deadline = time.time() + 90
    while len(_complete(url, "s")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = _complete(url, "s")
    assert len(before) >= 3
    rerun = _cli(*args, "--trials", "3", cwd=tmp_path)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    doc = json.loads(out)
    after = _complete(url, "s")
    assert all(after.get(n) == v for n, v in before.items())  # nothing lost, values unchanged
    assert sum(doc["new_trials"].values()) == 3
    assert max(after) > max(before)  # the count continues


def test_ctrl_c_fails_only_the_running_trial_and_the_study_resumes(tiny_model, tmp_path, monkeypatch):
    from precondtune import search

    mf = load_model_file(tiny_model)
    settings = SearchSettings(optimizer="adamw", trials=10, steps=10, batch_size=16, pruner="none",
                              storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name="s")
    real, calls = search.train, []

    def interrupted_on_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(search, "train", interrupted_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_search(mf, settings)
    url = settings.storage
    before = _complete(url, "s")
    assert len(before) == 3
    r = run_search(mf, dataclasses.replace(settings, trials=3))
    after = _complete(url, "s")
    assert all(after.get(n) == v for n, v in before.items()) and len(after) == 6
    assert r.counts == {"complete": 6, "pruned": 0, "failed": 1, "running": 0, "waiting": 0}
    failed = r.frame[r.frame["state"] == "FAIL"]
    assert list(failed["number"]) == [3] and failed["reason"].iloc[0].startswith("interrupted")


runner = CliRunner()


def _tune(*args):
    return runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--steps", "3", "--trials", "1", *args])


@pytest.mark.parametrize("args, needle", [
    (["--set", "nosuch=1"], "valid:"),
    (["--set", "weight_decay=-1"], "weight_decay"),
    (["--set", "one_minus_beta1=0.9"], "out of range"),
    (["--set", "beta1=1.5"], "outside adamw's searched range [0.8, 0.98]; to fix it outside that range, give the "),
    (["--enqueue", "lr"], "KEY=VALUE"),
    (["--enqueue", "lr=0.01,bogus=2"], "valid:"),
    (["--storage", "postgresql://nobody@127.0.0.1:9/none"], "cannot open"),
    (["--storage", "ftp://x"], "not a storage URL"),
    (["-o", "all"], "tune searches one optimizer"),
    (["--study-name", ""], "--study-name is empty"),
    (["--adam-lr", "inf"], "--adam-lr inf"),
    (["--steps", "1000000000"], "lower --steps or --batch-size"),
    (["--sampler", "nope"], "valid:"),
    (["--workers", "2", "--storage", "memory"], "in memory"),
    (["--optimizer", "nosuch"], "valid:"),
    (["--optimizer", "shampoo", "--adam-lr", "1e-3", "--adam-betas", "0.9,0"], "no valid shampoo config"),
    (["--set", "eps=true"], "eps=True must be a number"),
    (["--set", "lr=abc"], "lr='abc' must be a number"),
    (["--set", "lr=inf"], "must be finite"),
    (["--optimizer", "muon", "--set", "ns_steps=true"], "must be an integer"),
    (["--enqueue", "eps=true"], "must be a number"),
    (["--csv", "."], "is a directory"),
    (["--csv", ""], "is empty"),
    (["--csv", "/proc/precondtune/trials.csv"], "/proc"),  # nothing can be created there, even by root
    (["--set", "betas=[0.9,0.99]", "--set", "beta1=0.95"], "give one of them"),
    (["--set", "lr=0.01", "--enqueue", "lr=0.02"], "contradicts --set lr=0.01"),
    (["--enqueue", ""], "expected KEY=VALUE"),
    (["--set", " , "], "expected KEY=VALUE"),
    (["--set", "lr=0.001", "--set", "lr=0.01"], "--set lr is given twice (0.001 and 0.01); give it once"),
    (["--enqueue", "lr=0.001,lr=0.01"], "lr is given twice"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    r = _tune(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("storage, needle", [
    ("train.log", "is not an Optuna journal file"),  # a user's own log is not appended to
    ("journal:///{tmp}/train.log", "is not an Optuna journal file"),
    ("sqlite:///{tmp}/afile/x.db", "afile is a file, not a directory"),
    ("sqlite:///{tmp}/adir", "adir is a directory; name a file in it"),
    ("sqlite:///{tmp}/junk.db", "check that the file is an SQLite database"),
    ("mysql://nobody@127.0.0.1:9/none", "MySQL driver"),
])
def test_a_storage_that_is_not_one_is_refused_and_left_as_it_was(tmp_path, monkeypatch, storage, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.log").write_text("2026-12-07 step 1 loss 3.2\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "junk.db").write_text("not a database\n")
    before = {f.name: f.read_bytes() if f.is_file() else None for f in tmp_path.iterdir()}
    r = _tune("--storage", storage.format(tmp=tmp_path))
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert {f.name: f.read_bytes() if f.is_file() else None for f in tmp_path.iterdir()} == before


def test_study_made_for_another_optimizer_is_rejected_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _tune("-o", "adamw", "--study-name", "shared", "--json")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["storage"] == f"sqlite:///{tmp_path / 'precondtune-studies.db'}"  # the default, printed
    assert doc["optimizer"] == "adamw" and doc["study"] == "shared"
    assert set(doc["best"]) >= {"value", "hyperparameters"}
    assert set(doc["trials"]) >= {"complete", "pruned", "failed"}
    db = tmp_path / "precondtune-studies.db"
    snapshot = db.read_bytes()
    other = next(n for n in po.available() if n != "adamw")
    r = _tune("-o", other, "--study-name", "shared")
    assert r.exit_code == 2 and "adamw" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert db.read_bytes() == snapshot


def test_set_fixes_a_knob_and_enqueue_warm_starts_come_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _tune("-o", "adamw", "--trials", "4", "--storage", "memory", "--set", "weight_decay=0",
              "--set", "beta1=0.85", "--enqueue", "lr=0.02,beta2=0.95", "--adam-lr", "0.003",
              "--adam-betas", "0.9,0.95", "--csv", "trials.csv", "--json")
    assert r.exit_code == 0, r.stderr
    import pandas as pd

    frame = pd.read_csv(tmp_path / "trials.csv")
    assert len(frame) == 4
    assert (frame["weight_decay"] == 0).all()
    assert frame["betas"].map(lambda b: json.loads(b)[0]).eq(0.85).all()
    first = frame.sort_values("number").head(3)
    assert list(first["enqueued"]) == ["defaults", "adamw-transfer", "--enqueue lr=0.02,beta2=0.95"]
    assert list(first["lr"]) == [1e-3, 0.003, 0.02]


def _outcome(r):
    f = r.frame
    return sorted(zip(f["number"], f["state"], f["steps_run"], f["value"].fillna(-1.0), f["last_report"].fillna(-1.0),
                      f["reason"]))


def test_completed_snapshot_prunes_exactly_like_the_median_pruner(tiny_model, monkeypatch):
    import precondtune.search as search

    settings = SearchSettings(optimizer="adamw", trials=12, steps=40, batch_size=16, storage="memory",
                              pruner="median", adamw=AdamWReference(lr=0.3))
    mf = load_model_file(tiny_model)
    snap = _outcome(run_search(mf, settings))
    monkeypatch.setattr(search, "CompletedSnapshot", lambda pruner: pruner)
    plain = _outcome(run_search(mf, settings))
    assert any("median pruner" in reason for *_, reason in snap)  # the comparison exercises real pruning
    assert snap == plain


def test_no_pruner_verdict_before_a_fifth_of_the_steps_or_during_the_warmup(tiny_model):
    """The first tenth's losses rank configurations poorly (benchmarks/pruning_start.py): the pruner starts at
    PRUNE_AFTER of the steps, later if the lr warmup runs longer."""
    import precondtune.search as search
    from precondtune.training import Schedule

    assert search.PRUNE_AFTER == 0.2
    assert search.make_pruner("median", Schedule(200), 20).pruner._n_warmup_steps == 40
    assert search.make_pruner("median", Schedule(200, warmup=60), 20).pruner._n_warmup_steps == 60
    assert search.make_pruner("halving", Schedule(200), 20)._min_resource == 40
    settings = SearchSettings(optimizer="adamw", trials=12, steps=40, batch_size=16, storage="memory",
                              pruner="median", adamw=AdamWReference(lr=0.3))
    r = run_search(load_model_file(tiny_model), settings)
    steps = [n for n, reason in zip(r.frame["steps_run"], r.frame["reason"]) if "median pruner" in str(reason)]
    assert steps and min(steps) >= 8  # reports every 4 steps; the first verdict may come at step 8 of 40


def test_constant_liar_only_where_trials_run_side_by_side(tiny_model, monkeypatch, tmp_path):
    import precondtune.search as search

    def shared(url, workers=1):
        return search.is_shared(search.open_storage(url, workers=workers), workers)

    assert not shared(f"sqlite:///{tmp_path}/a.db") and not shared("memory")
    assert shared(f"sqlite:///{tmp_path}/a.db", workers=2) and shared(f"journal:///{tmp_path}/a.log")
    # one process: the liar has no other running trial to count, so TPE proposes exactly the same configs
    settings = SearchSettings(optimizer="adamw", trials=8, steps=20, batch_size=16, storage="memory", pruner="none")
    mf = load_model_file(tiny_model)
    alone = run_search(mf, settings).frame
    monkeypatch.setattr(search, "is_shared", lambda ref, workers: True)
    liar = run_search(mf, settings).frame
    assert len(alone) == 8
    assert alone["lr"].tolist() == liar["lr"].tolist() and alone["value"].tolist() == liar["value"].tolist()


def test_completed_snapshot_reads_the_storage_only_when_it_is_stale(monkeypatch):
    import precondtune.search as search
    from precondtune.search import CompletedSnapshot

    study = optuna.create_study()
    for v in (1.0, 2.0, 3.0):
        study.add_trial(optuna.trial.create_trial(value=v, intermediate_values={1: v, 2: v}))
    reads = []
    real = study.get_trials

    def counting(deepcopy=True, states=None):
        reads.append(states)
        return real(deepcopy=deepcopy, states=states)

    study.get_trials = counting
    clock = [100.0]
    monkeypatch.setattr(search.time, "monotonic", lambda: clock[0])
    pruner = CompletedSnapshot(optuna.pruners.MedianPruner(n_startup_trials=1))

    def running(number, value):
        t = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values={1: value})
        t.number = number
        return t

    assert all(pruner.prune(study, running(3, 9.0)) for _ in range(4))
    assert len(reads) == 1
    middling = running(4, 1.5)
    assert not pruner.prune(study, middling)  # median of 1, 2, 3 at step 1
    assert len(reads) == 1  # the next trial reuses the snapshot
    for number in (5, 6):  # two trials this process completes join it without a read ...
        done = optuna.trial.create_trial(value=0.1, intermediate_values={1: 0.1})
        done.number = number
        pruner.observe(study, done)
    pruner.observe(optuna.create_study(), optuna.trial.create_trial(value=0.0, intermediate_values={1: 0.0}))
    pruned = optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.0})
    pruner.observe(study, pruned)  # ... but not another study's trial, nor a pruned one
    assert pruner.prune(study, running(7, 1.5))  # median of 0.1, 0.1, 1, 2, 3 is 1
    assert len(reads) == 1
    clock[0] += search.SNAPSHOT_SECONDS + 1  # trials finished by other workers are read after SNAPSHOT_SECONDS
    assert not pruner.prune(study, running(8, 1.5))  # the storage has only 1, 2, 3
    assert len(reads) == 2


def test_trials_written_by_0_1_0_with_one_attr_per_measurement_are_still_read():
    from precondtune.search import trials_frame

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.5, user_attrs={"steps_run": 40, "train_seconds": 0.5,
                                                                     "trial_seconds": 0.6}))
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"result": {"steps_run": 40, "train_seconds": 0.4,
                                                                                "trial_seconds": 0.45}}))
    f = trials_frame(study)
    assert list(f["steps_run"]) == [40, 40] and list(f["train_seconds"]) == [0.4, 0.5]


def test_trials_of_earlier_releases_keep_their_config_and_pruned_reason():
    from precondtune.search import hyperparameters_of, pruned_reason_of, trials_frame

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.PRUNED, intermediate_values={40: 2.0},
        user_attrs={"hyperparameters": {"lr": 0.01}, "pruned_reason": "median pruner at step 40",
                    "result": {"steps_run": 40, "train_seconds": 0.4, "trial_seconds": 0.45}}))
    t = study.trials[0]
    assert hyperparameters_of(t) == {"lr": 0.01} and pruned_reason_of(t) == "median pruner at step 40"
    f = trials_frame(study)
    assert f["lr"][0] == 0.01 and f["reason"][0] == "median pruner at step 40"


def test_a_trial_writes_its_run_once_and_reports_only_what_a_pruner_judges(tiny_model, monkeypatch):
    """Each storage write is a commit (1–3 ms on SQLite): a trial's own writes are its result, once, and the
    reports from the first step a pruner judges on; the result keeps every report."""
    from optuna.storages import InMemoryStorage

    from precondtune import search

    writes: list[tuple[int, str]] = []
    attr = InMemoryStorage.set_trial_user_attr
    monkeypatch.setattr(InMemoryStorage, "set_trial_user_attr",
                        lambda self, tid, key, value: (writes.append((tid, key)), attr(self, tid, key, value))[1])
    settings = SearchSettings(optimizer="adamw", trials=12, steps=40, batch_size=16, storage="memory",
                              pruner="median", adamw=AdamWReference(lr=0.3))
    opened = {}
    monkeypatch.setattr(search, "open_storage", lambda url, **kw: opened.setdefault("ref", search._open(
        url, workers=1, create_file=True)))
    r = run_search(load_model_file(tiny_model), settings)
    study = optuna.load_study(study_name=r.study, storage=opened["ref"].storage)
    first = search.judged_from(settings.schedule(), settings.report_every)
    assert (first, settings.report_every) == (8, 4)
    trials = study.get_trials()
    assert {t.state for t in trials} >= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        result = t.user_attrs["result"]
        assert [key for tid, key in writes if tid == t._trial_id] == ["result"]  # one write of its own
        assert search.hyperparameters_of(t) is not None and "lr" in search.hyperparameters_of(t)
        reported = sorted(int(k) for k in result["reports"])
        assert reported == list(range(4, result["steps_run"] + 1, 4))  # every window's mean is kept
        assert sorted(t.intermediate_values) == [s for s in reported if first <= s < 40]
        assert (t.state == TrialState.PRUNED) == bool(search.pruned_reason_of(t))
        assert t.state != TrialState.PRUNED or search.pruned_reason_of(t) == r.frame.set_index("number")[
            "reason"][t.number]


def test_a_killed_trial_is_rerun_with_the_config_it_was_sampled_with(tiny_model, tmp_path, monkeypatch):
    """A trial killed mid-run wrote nothing of its own: its params (written as it sampled them) give its re-run
    the same config."""
    from precondtune import search

    monkeypatch.setattr(search, "GRACE_SECONDS", 1)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    settings = SearchSettings(optimizer="adamw", trials=3, steps=6, batch_size=16, storage=url, study_name="k",
                              pruner="none", fixed=("weight_decay=0.05",))
    mf = load_model_file(tiny_model)
    run_search(mf, settings)
    ref = search.open_storage(url)
    study = optuna.load_study(study_name="k", storage=ref.storage)
    zombie = study.ask()  # a sampled trial (the warm starts ran), killed once it had its config
    sampled = search._jsonable(po.config_dict(search.Objective(mf, settings).config(zombie)))
    assert sampled["weight_decay"] == 0.05
    ref.storage.record_heartbeat(zombie._trial_id)
    time.sleep(2.2)
    run_search(mf, dataclasses.replace(settings, trials=1))
    study = optuna.load_study(study_name="k", storage=ref.storage)
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == zombie.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert search.hyperparameters_of(retry[0]) == json.loads(json.dumps(sampled))


def test_progress_counts_match_the_study(tiny_model):
    calls = []
    settings = SearchSettings(optimizer="adamw", trials=8, steps=20, batch_size=16, storage="memory",
                              pruner="none", adamw=AdamWReference(lr=3.0))
    r = run_search(load_model_file(tiny_model), settings, progress=lambda *a: calls.append(a))
    done = [c[0] for c in calls]
    assert done[0] == 0 and done == sorted(done) and done[-1] == 8
    last = calls[-1]
    assert last[1] == 8 and last[2] == r.best_value
    assert (last[3], last[4]) == (r.new["pruned"], r.new["failed"]) and r.new["pruned"] > 0


@pytest.mark.parametrize("seeds", [1, 2])
def test_the_table_has_a_column_per_searched_knob_and_seeds_only_when_run(tiny_model, seeds):
    result = CliRunner().invoke(app, ["tune", str(tiny_model), "--steps", "6", "--trials", "4", "--storage", "memory",
                                      "--pruner", "none", "--seeds", str(seeds)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "trial" in line and "state" in line)
    assert {"lr", "weight_decay", "steps", "note"} <= set(header.replace("┃", " ").split())
    assert ("seed median" in header) == (seeds > 1)


def _muon_settings(**kw):
    return SearchSettings(optimizer="muon", trials=3, steps=6, batch_size=16, storage="memory", pruner="none", **kw)


def test_set_ns_schedule_holds_for_the_warm_starts_too(tiny_model):
    from precondtune.optim import muon

    r = run_search(load_model_file(tiny_model), _muon_settings(fixed=("ns_schedule=polar-express",)))
    assert len(r.frame) == 3 and (r.frame["enqueued"] == "defaults").sum() == 1
    for coefficients, steps in zip(r.frame["ns_coefficients"], r.frame["ns_steps"]):
        assert tuple(map(tuple, json.loads(coefficients))) == muon.polar_express(int(steps))


def test_ns_steps_fixed_below_the_searched_range_runs_every_trial(tiny_model):
    from precondtune.optim import muon
    from precondtune.optim.kernels import newton_schulz as ns

    assert muon.converging_quintic(4.5, 1.0, 1.0, 3) == ns.PUBLIC_QUINTIC  # nothing converges in 3 steps
    r = run_search(load_model_file(tiny_model), _muon_settings(fixed=("ns_steps=3", "ns_schedule=custom")))
    assert r.counts["failed"] == 0 and r.counts["complete"] == 3


def test_a_study_from_0_1_0_does_not_rerun_its_exact_warm_starts(tiny_model):
    from precondtune.search import Objective, _enqueue_warm_starts

    settings = _muon_settings()
    obj = Objective(load_model_file(tiny_model), settings)
    study = optuna.create_study()
    config = _jsonable(po.config_dict(obj.spec.default_config()))
    # 0.1.0 recorded the defaults without the ns_schedule param, which did not exist yet
    study.add_trial(optuna.trial.create_trial(
        value=1.0, params={"ns_steps": 5}, distributions={"ns_steps": optuna.distributions.IntDistribution(4, 6)},
        user_attrs={"enqueued": "defaults", "overrides": {}, "enqueued_config": config}))
    _enqueue_warm_starts(study, obj, settings)
    assert study.get_trials(states=(TrialState.WAITING,)) == []


def test_a_running_trial_left_by_a_killed_run_is_not_counted_as_new(tiny_model, tmp_path, monkeypatch):
    from precondtune import search

    monkeypatch.setattr(search, "GRACE_SECONDS", 1)  # the killed trial's heartbeat goes stale within the run
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    settings = SearchSettings(optimizer="adamw", trials=2, steps=6, batch_size=16, storage=url, study_name="k",
                              pruner="none")
    mf = load_model_file(tiny_model)
    run_search(mf, settings)
    ref = search.open_storage(url)
    zombie = optuna.load_study(study_name="k", storage=ref.storage).ask()  # what a SIGKILL mid-trial leaves
    ref.storage.record_heartbeat(zombie._trial_id)
    time.sleep(2.2)  # SQLite timestamps have 1 s resolution: 2 s old is surely past a 1 s grace
    calls = []
    r = run_search(mf, settings, progress=lambda *a: calls.append(a))
    states = dict(zip(r.frame["number"], r.frame["state"]))
    reasons = dict(zip(r.frame["number"], r.frame["reason"]))
    assert states[zombie.number] == "FAIL" and reasons[zombie.number] == search.STOPPED  # failed by the check
    study = optuna.load_study(study_name="k", storage=ref.storage)
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == zombie.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE  # its config re-run once ...
    assert sum(r.new.values()) == 3 and calls[-1][:2] == (3, 3)  # ... on top of the 2 new trials asked for
    assert r.counts["waiting"] == 0


def test_trials_0_shows_the_study_and_adds_nothing(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    mf = load_model_file(tiny_model)
    with pytest.raises(ConfigError, match="no study 'z'"):  # a mistyped name or storage creates nothing
        run_search(mf, SearchSettings(optimizer="adamw", trials=0, storage=url, study_name="z"))
    assert not (tmp_path / "studies.db").exists()
    run_search(mf, SearchSettings(optimizer="adamw", trials=1, steps=4, storage=url, study_name="z"))
    with pytest.raises(ConfigError, match="no study 'y'"):
        run_search(mf, SearchSettings(optimizer="adamw", trials=0, steps=4, storage=url, study_name="y"))
    r = run_search(mf, SearchSettings(optimizer="adamw", trials=0, steps=4, storage=url, study_name="z"))
    assert r.counts == {"complete": 1, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}


def test_warm_starts_are_queued_once_and_again_after_a_ctrl_c(tiny_model, tmp_path, monkeypatch):
    from precondtune import search

    mf = load_model_file(tiny_model)
    settings = SearchSettings(optimizer="adamw", trials=2, steps=4, batch_size=16, pruner="none", study_name="w",
                              storage=f"sqlite:///{tmp_path / 'studies.db'}", enqueue=("lr=0.01",))
    real = search.train
    monkeypatch.setattr(search, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the first trial: the defaults
        run_search(mf, settings)
    monkeypatch.setattr(search, "train", real)
    run_search(mf, settings)
    run_search(mf, settings)  # a rerun queues no start again
    trials = optuna.load_study(study_name="w", storage=settings.storage).get_trials()
    starts = [(t.user_attrs["enqueued"], t.state) for t in trials if "enqueued" in t.user_attrs]
    assert starts == [("defaults", TrialState.FAIL), ("--enqueue lr=0.01", TrialState.COMPLETE),
                      ("defaults", TrialState.COMPLETE)]
    assert len(trials) == 5


def test_a_failed_trial_shows_dashes_not_nan_in_the_table(tiny_model, monkeypatch):
    from precondtune import search

    real, calls = search.train, []

    def fails_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(search, "train", fails_second)
    result = CliRunner().invoke(app, ["tune", str(tiny_model), "--steps", "6", "--trials", "3", "--storage", "memory",
                                      "--pruner", "none"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "boom" in result.stdout and "nan" not in result.stdout.lower()


def test_a_worker_process_exits_130_on_ctrl_c_without_a_traceback(monkeypatch, capsys):
    from precondtune import search

    def interrupted(_model):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "load_model_file", interrupted)
    # a thread left running (as a model file may leave one): called in-process, the worker must still raise, not
    # end the process without waiting for it as a real --workers process does
    release = threading.Event()
    threading.Thread(target=release.wait, args=(60,), name="left-running").start()
    try:
        with pytest.raises(SystemExit) as e:
            search._worker("m.py", SearchSettings(optimizer="adamw"), "s", 1, 1, 1, 0)
    finally:
        release.set()
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_what_the_model_file_lacks_for_a_search_stops_it_before_a_study_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = runner.invoke(app, ["tune", str(EXAMPLES / "llama7b_meta.py"), "--trials", "1", "--steps", "2"])
    assert meta.exit_code == 2 and "meta device" in meta.stderr and meta.stderr.strip().count("\n") == 0
    (tmp_path / "m").mkdir()
    model = tmp_path / "m" / "nologits.py"
    model.write_text("import torch\nimport torch.nn.functional as F\n"
                     "def build_model():\n    return torch.nn.Linear(4, 3)\n"
                     "def sample_batch(n):\n    return torch.randn(n, 4), torch.randint(3, (n,))\n"
                     "def loss_fn(model, batch):\n    return F.cross_entropy(model(batch[0]), batch[1])\n")
    sophia = runner.invoke(app, ["tune", str(model), "-o", "sophia", "--trials", "1", "--steps", "2"])
    assert sophia.exit_code == 2 and "--set estimator=hutchinson" in sophia.stderr, sophia.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no study file
    ok = runner.invoke(app, ["tune", str(model), "-o", "sophia", "--trials", "1", "--steps", "2", "--storage",
                             "memory", "--set", "estimator=hutchinson"])
    assert ok.exit_code == 0, ok.stderr


def test_json_top_follows_top_and_shows_pruned_trials_with_reasons(tiny_model, tmp_path):
    r = runner.invoke(app, ["tune", str(tiny_model), "--steps", "6", "--trials", "4", "--storage", "memory",
                            "--pruner", "none", "--adam-lr", "50", "--top", "3", "--json"])
    doc = json.loads(r.stdout)
    assert len(doc["top"]) == 3
    states = [row["state"] for row in doc["top"]]
    assert states == sorted(states, key=["COMPLETE", "PRUNED", "FAIL"].index)
    pruned = [row for row in doc["top"] if row["state"] == "PRUNED"]
    assert pruned and all(row["reason"].startswith("diverged") for row in pruned)
    # value is an eval loss, which a pruned trial does not have; where it stopped is its last_report
    assert all(row["value"] is None for row in pruned)
    assert all(row["last_report"] is None for row in doc["top"] if row["state"] == "COMPLETE")


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
def test_workers_stop_when_the_parent_is_killed(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    proc = _cli("tune", str(tiny_model), "--steps", "5", "--batch-size", "16", "--storage", url, "--study-name", "o",
                "--pruner", "none", "--workers", "2", "--trials", "100000", cwd=tmp_path)
    deadline = time.time() + 120
    while len(_complete(url, "o")) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers
    proc.kill()
    proc.communicate(timeout=60)

    def alive():
        return [w for w in workers if Path(f"/proc/{w}").exists()
                and "zombie" not in Path(f"/proc/{w}/status").read_text()]

    deadline = time.time() + 20  # a worker finishes the trial it is in, then stops (its share would take minutes)
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
@pytest.mark.parametrize(("sig", "workers", "code", "last_line", "how"), [
    (signal.SIGTERM, 2, 143, "terminated", "SIGTERM"), (signal.SIGINT, 1, 130, "interrupted", "Ctrl-C")])
def test_sigterm_and_ctrl_c_stop_a_search_between_steps(tmp_path, sig, workers, code, last_line, how):
    """A kill or a scheduler's preemption (SIGTERM, passed on to the workers) and Ctrl-C fail the running trials
    with the reason and leave nothing RUNNING for the heartbeat to find later; the study resumes."""
    slow = tmp_path / "slow.py"  # 20 ms a step: the signal comes during a trial's training steps
    # the sleep is in training steps only (the evaluation runs without grad): a signal lands during one of them
    text = OVERFLOWING_MODEL.replace("    x, y = batch\n",
                                     "    x, y = batch\n    if torch.is_grad_enabled():\n        time.sleep(0.02)\n")
    slow.write_text(text.replace("import torch\n", "import time\nimport torch\n", 1))
    assert "time.sleep" in text
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ["tune", str(slow), "--steps", "40", "--batch-size", "16", "--storage", url, "--study-name", "t",
            "--pruner", "none", "--workers", str(workers)]
    proc = _cli(*args, "--trials", "100000", cwd=tmp_path)
    deadline = time.time() + 120
    while len(_complete(url, "t")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    children = _children(proc.pid)
    assert len(children) >= workers - 1
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == last_line and "Traceback" not in err
    def running(pid):
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:  # reaped
            return False

    deadline = time.time() + 20
    while any(running(w) for w in children) and time.time() < deadline:
        time.sleep(0.2)
    study = optuna.load_study(study_name="t", storage=url)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
    assert all(r.startswith(f"interrupted ({how})") for r in reasons), reasons
    # a signal in the last few milliseconds of a trial (its evaluation and tell) stops the search between trials
    assert reasons or trials[-1].state == TrialState.COMPLETE
    before = _complete(url, "t")
    rerun = _cli(*args, "--trials", "2", cwd=tmp_path)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    after = _complete(url, "t")
    assert all(after.get(n) == v for n, v in before.items()) and len(after) == len(before) + 2


def test_warm_starts_left_in_the_queue_are_pointed_out(tmp_path):
    r = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--steps", "3", "--trials", "1", "--storage", "memory",
                            "--enqueue", "lr=0.01", "--enqueue", "lr=0.02"])
    assert r.exit_code == 0, r.output
    assert "note: 2 queued trial(s)" in r.stderr
    assert "did not run" in r.stderr and "raise --trials" in r.stderr and "rerun" not in r.stderr  # no next run


def test_the_resume_hint_selects_the_study_again_and_trials_0_shows_it_with_its_own_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--steps", "4", "--batch-size", "4", "--trials", "1",
                                "--storage", url])
    assert first.exit_code == 0, first.output
    hint = first.stderr.split("(resume: ", 1)[1].split(")", 1)[0]
    assert hint == f"--study-name mlp-adamw --storage {url} --optimizer adamw --steps 4 --batch-size 4"
    again = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "1", *hint.split()])
    assert again.exit_code == 0, again.output
    # another optimizer's study: the hint names it (without it the rerun tuned adamw and was refused)
    soap = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "-o", "adam-mini", "--steps", "4", "--trials", "1",
                               "--storage", url])
    assert soap.exit_code == 0, soap.output
    hint_soap = soap.stderr.split("(resume: ", 1)[1].split(")", 1)[0]
    assert "--optimizer adam-mini" in hint_soap
    again = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "1", *hint_soap.split()])
    assert again.exit_code == 0, again.output
    import shutil

    for suffix in ("", "-wal", "-shm"):  # write-ahead logging: the file and its log
        if (tmp_path / f"s.db{suffix}").exists():
            shutil.copy(tmp_path / f"s.db{suffix}", tmp_path / f"copy.db{suffix}")
    shown = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "0", "--seeds", "2", "--storage", url,
                                "--json"])
    assert shown.exit_code == 0, shown.output  # showing needs none of the study's trial settings
    assert hint in shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["trials"]["complete"] + doc["trials"]["pruned"] == 2
    given = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "0", "--seeds", "2", "--steps", "4",
                                "--batch-size", "4", "--storage", f"sqlite:///{tmp_path / 'copy.db'}", "--json"])
    assert given.exit_code == 0, given.output
    assert doc["best"]["seed_values"] == json.loads(given.stdout)["best"]["seed_values"]  # re-run as the study was
    other = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "1", "--storage", url])
    assert other.exit_code == 2 and "trial settings" in other.stderr  # adding trials still needs them


def test_the_resume_hint_carries_the_transfer_the_sets_and_the_sampler(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "-o", "muon", "--steps", "4", "--batch-size", "4",
                                "--trials", "1", "--storage", url, "--adam-lr", "3e-3", "--set", "ns_steps=4",
                                "--set", "momentum=0.9", "--sampler", "random", "--pruner", "none"])
    assert first.exit_code == 0, first.output
    hint = first.stderr.split("(resume: ", 1)[1].split(")", 1)[0]
    assert hint.endswith("--adam-lr 0.003 --adam-betas 0.9,0.999 --adam-weight-decay 0.01 --set ns_steps=4 "
                         "--set momentum=0.9 --sampler random --pruner none"), hint
    again = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "1", *hint.split()])
    assert again.exit_code == 0 and "note:" not in again.stderr, again.output  # the same search, no --set note
    shown = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "-o", "muon", "--trials", "0", "--storage", url,
                                "--study-name", "mlp-muon", "--json"])
    assert shown.exit_code == 0, shown.output  # showing takes the study's own transfer too
    assert json.loads(shown.stdout)["trials"]["complete"] == 2


@pytest.mark.parametrize("change", ["another file of the same name", "the file edited", "no --adam-lr",
                                    "another --adam-lr"])
def test_a_study_refuses_trials_of_another_model_or_transfer_and_is_left_untouched(tmp_path, monkeypatch, change):
    """The default study name is FILE-OPTIMIZER: another model file of that name, or the same one edited, would
    add trials that do not compare; so would another transfer (it sets Muon's learning-rate convention)."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "mlp.py"
    model.write_text((EXAMPLES / "mlp.py").read_text())
    base = ["tune", "mlp.py", "-o", "muon", "--steps", "3", "--batch-size", "4", "--trials", "1"]
    first = runner.invoke(app, [*base, "--adam-lr", "3e-3"])
    assert first.exit_code == 0, first.output
    copy = tmp_path / "copy" / "mlp.py"  # the same contents elsewhere (another machine's checkout) is the same model
    copy.parent.mkdir()
    copy.write_text(model.read_text())
    same = runner.invoke(app, ["tune", str(copy), *base[2:], "--adam-lr", "3e-3"])
    assert same.exit_code == 0, same.output
    def contents():
        storage = f"sqlite:///{tmp_path / 'precondtune-studies.db'}"
        study = optuna.load_study(study_name="mlp-muon", storage=storage)
        return study.user_attrs, [(t.number, t.state, t.params) for t in study.trials]

    snapshot = contents()
    args, needle = {
        "another file of the same name": ([str(copy), *base[2:], "--adam-lr", "3e-3"], "another model file"),
        "the file edited": (["mlp.py", *base[2:], "--adam-lr", "3e-3"], "as it was then (it has changed since)"),
        "no --adam-lr": (base[1:], "was made with --adam-lr 0.003 --adam-betas 0.9,0.999 --adam-weight-decay 0.01 "
                                   "(this run: no --adam-lr)"),
        "another --adam-lr": ([*base[1:], "--adam-lr", "1e-2"], "(this run: --adam-lr 0.01"),
    }[change]
    if change == "another file of the same name":
        copy.write_text(copy.read_text().replace("manual_seed(7)", "manual_seed(8)"))
    if change == "the file edited":
        model.write_text(model.read_text() + "# edited\n")
    r = runner.invoke(app, ["tune", *args])
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "use another --study-name" in r.stderr
    assert contents() == snapshot


@pytest.mark.parametrize("json_", [[], ["--json"]])
def test_a_timeout_that_ends_the_run_is_named_as_the_reason(tmp_path, json_):
    r = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--steps", "3", "--trials", "3", "--timeout", "0",
                            "--storage", f"sqlite:///{tmp_path / 's.db'}", *json_])
    assert r.exit_code == 1 and "no trial completed; --timeout ended the run" in r.stderr
    if json_:  # the reason for exit 1 is on stderr with --json too; stdout is the one document
        assert json.loads(r.stdout)["best"]["value"] is None
    assert "wait for the next run: --timeout ended the run first" in r.stderr


def test_showing_a_study_prepares_only_its_own_trial_settings(tmp_path, monkeypatch):
    from precondtune import search

    url = f"sqlite:///{tmp_path / 's.db'}"
    made = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--steps", "4", "--trials", "1", "--storage", url])
    assert made.exit_code == 0, made.output
    real, drawn = search.prepare, []
    monkeypatch.setattr(search, "prepare", lambda *a, **k: drawn.append(k["steps"]) or real(*a, **k))
    shown = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "0", "--storage", url])
    assert shown.exit_code == 0, shown.output
    assert drawn == [4]  # not the command line's default 200 steps of batches first


def test_every_trial_diverging_on_an_fp16_model_says_why(tmp_path):
    path = tmp_path / "half.py"
    path.write_text(
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
        "def build_model():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).half()\n"
        "def sample_batch(n):\n    return torch.randn(n, 8).half(), torch.randint(0, 4, (n,))\n"
        "def loss_fn(model, batch):\n    return F.cross_entropy(model(batch[0]).float(), batch[1])\n")
    r = runner.invoke(app, ["tune", str(path), "-o", "adamw", "--trials", "2", "--steps", "6", "--storage", "memory",
                            "--json"])
    doc = json.loads(r.stdout)
    assert doc["best"] is None or doc["best"]["value"] is None
    assert "every trial diverged; the model's parameters are fp16" in doc["first_failure"], doc["first_failure"]


def test_adding_trials_with_another_set_to_a_study_is_pointed_out(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    base = ["tune", str(EXAMPLES / "mlp.py"), "--steps", "3", "--trials", "1", "--storage", url]
    first = runner.invoke(app, [*base, "--set", "weight_decay=0"])
    same = runner.invoke(app, [*base, "--set", "weight_decay=0"])
    other = runner.invoke(app, [*base, "--set", "weight_decay=0.1"])
    assert first.exit_code == same.exit_code == other.exit_code == 0, other.output
    assert "note: study" not in first.stderr and "note: study" not in same.stderr
    assert ("note: study mlp-adamw was made with --set weight_decay=0 and this run adds trials with "
            "--set weight_decay=0.1") in other.stderr


def test_a_list_value_without_brackets_says_how_to_write_one():
    r = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "-o", "muon", "--trials", "0", "--storage", "memory",
                            "--set", "ns_coefficients=3.4,-4.7,2.0"])
    assert r.exit_code == 2 and "a list value goes in brackets, e.g. betas=[0.9,0.99]" in r.stderr
    r = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "--trials", "0", "--storage", "memory",
                            "--set", "betas=0.9"])
    assert r.exit_code == 2 and "betas=0.9 must be a list like [0.9, 0.999]" in r.stderr


@pytest.mark.parametrize("extra, noted", [([], True), (["--adam-lr", "3e-3"], False), (["--set", "lr=0.001"], False)])
def test_a_set_scale_outside_the_lr_range_s_convention_is_pointed_out(extra, noted):
    r = runner.invoke(app, ["tune", str(EXAMPLES / "mlp.py"), "-o", "muon", "--set", "scale=match_rms_adamw", *extra,
                            "--steps", "3", "--batch-size", "4", "--trials", "1", "--storage", "memory"])
    assert r.exit_code == 0, r.output
    assert ("was made for scale=original" in r.stderr) == noted, r.stderr
