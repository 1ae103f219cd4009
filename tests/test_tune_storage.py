"""Several workers on one study: SQLite file, Optuna's journal file, and a real PostgreSQL server."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import ROOT

from precondtune.modelfile import load_model_file
from precondtune.search import SearchSettings, _with_driver, run_search

optuna.logging.set_verbosity(optuna.logging.ERROR)

TINY = '''
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

def sample_batch(batch_size):
    x = torch.randn(batch_size, 4)
    return x, x.sum(-1, keepdim=True)

def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
'''


def _postgres_url() -> tuple[str | None, str]:
    url = os.environ.get("PRECONDTUNE_TEST_POSTGRES")
    if url:
        return url, ""
    ci = ROOT / ".ci"
    if (ci / "postgres.url").exists():
        return (ci / "postgres.url").read_text().strip(), ""
    why = (ci / "postgres.skip").read_text().strip() if (ci / "postgres.skip").exists() else \
        "no server: run .ci/postgres (Debian's postgresql on loopback) or set PRECONDTUNE_TEST_POSTGRES"
    return None, why


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return load_model_file(path)


def _two_workers(mf, storage: str, study: str, trials: int = 4, sampler: str = "tpe"):
    settings = SearchSettings(optimizer="adamw", trials=trials, steps=8, batch_size=8, storage=storage,
                              study_name=study, workers=2, pruner="none", sampler=sampler)
    r = run_search(mf, settings)
    assert sum(r.new.values()) == trials  # exactly the requested number of new trials
    numbers = list(r.frame["number"])
    assert len(numbers) >= trials and len(numbers) == len(set(numbers))
    assert r.frame["lr"].nunique() == len(numbers)  # distinct configs, not one proposal run twice
    assert r.best_value is not None
    return r


def test_two_workers_share_one_sqlite_study(tiny, tmp_path):
    _two_workers(tiny, f"sqlite:///{tmp_path / 'studies.db'}", "w")


def test_resumed_workers_do_not_repeat_the_configs_they_ran_before(tiny, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    _two_workers(tiny, url, "r", sampler="random")
    again = _two_workers(tiny, url, "r", sampler="random")  # asserts every lr of the 8 trials differs
    assert len(again.frame) == 8


def test_journal_file_storage_runs_workers_and_resumes(tiny, tmp_path):
    url = f"journal:///{tmp_path / 'studies.log'}"
    _two_workers(tiny, url, "j")
    again = run_search(tiny, SearchSettings(optimizer="adamw", trials=1, steps=8, batch_size=8, storage=url,
                                            study_name="j", pruner="none"))
    assert again.counts["complete"] + again.counts["pruned"] == 5 and again.storage == url


def test_two_workers_share_one_postgresql_study(tiny):
    url, why = _postgres_url()
    if url is None:
        pytest.skip(f"PostgreSQL unavailable: {why}")
    try:
        optuna.storages.RDBStorage(_with_driver(url))
    except Exception as e:  # noqa: BLE001 - report why the server could not be reached, then skip
        pytest.skip(f"PostgreSQL at {url} unreachable: {type(e).__name__}: {e}")
    study = f"pg-{uuid.uuid4().hex[:8]}"
    r = _two_workers(tiny, url, study)
    assert r.storage == url
    storage = optuna.storages.RDBStorage(_with_driver(url))
    assert study in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    optuna.delete_study(study_name=study, storage=storage)


def test_the_default_storage_is_a_sqlite_file_in_the_working_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_search(tiny, SearchSettings(optimizer="adamw", trials=1, steps=4, batch_size=8))
    assert r.storage == f"sqlite:///{Path(tmp_path / 'precondtune-studies.db')}"
    assert (tmp_path / "precondtune-studies.db").exists()
