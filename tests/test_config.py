"""The recommended-config file: schema-1 validation naming the bad key, atomic writes, and build_optimizer
building exactly what the file says."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import load_example

import precondtune
import precondtune.optim as po
from precondtune import config as pc
from precondtune.errors import ConfigError

DOC = {
    "schema_version": 1,
    "optimizer": "muon",
    "hyperparameters": {"lr": 0.02, "momentum": 0.9, "ns_steps": 5, "ns_coefficients": [3.4445, -4.7750, 2.0315],
                        "weight_decay": 0.0},
    "param_groups": [
        {"match": "embedding|head|vector", "optimizer": "adamw",
         "hyperparameters": {"lr": 0.003, "betas": [0.8, 0.95], "weight_decay": 0.0}},
    ],
    "estimates": {"optimizer_state_bytes": 0},
    "evidence": {"trials": 0},
}


def _groups_by_role(opt):
    return {(g["role"], type(part).__name__): g for part in opt.parts for g in part.param_groups}


def test_build_optimizer_builds_exactly_what_the_file_says(tmp_path):
    path = pc.write(DOC, tmp_path / "recommended.yaml")
    text = path.read_text()
    assert "betas: [0.8, 0.95]" in text  # tuples as YAML lists
    mf = load_example("chargpt")
    model = mf.build()
    opt = precondtune.build_optimizer(model, path)
    groups = _groups_by_role(opt)
    muon = groups[("matrix", "Muon")]
    assert muon["lr"] == 0.02 and muon["momentum"] == 0.9 and tuple(muon["ns_coefficients"]) == (3.4445, -4.775, 2.0315)
    for role in ("embedding", "head", "vector"):
        g = groups.get((role, "AdamW"))
        if g is not None:
            assert g["lr"] == 0.003 and tuple(g["betas"]) == (0.8, 0.95) and g["weight_decay"] == 0.0
    assert {r for r, _ in groups} >= {"matrix", "embedding", "vector"}
    loss = mf.loss(model, mf.sample_batch(4))
    loss.backward()
    opt.step()


def test_yaml_json_and_dict_give_the_same_optimizer(tmp_path):
    y = pc.write(DOC, tmp_path / "c.yaml")
    j = pc.write(DOC, tmp_path / "c.json")
    assert json.loads(j.read_text())["hyperparameters"]["lr"] == 0.02
    a, b, c = (pc.load(x) for x in (y, j, DOC))
    assert a == b == c


def test_exponent_numbers_written_by_hand_are_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("schema_version: 1\noptimizer: AdamW\nhyperparameters: {lr: 3e-4, eps: 1e-8}\n")
    cfg = pc.load(p)
    assert cfg.optimizer == "adamw" and cfg.hyperparameters == {"lr": 3e-4, "eps": 1e-8}


@pytest.mark.parametrize(("change", "key"), [
    ({"optimizer": "adamz"}, "optimizer"),
    ({"schema_version": 2}, "schema_version"),
    ({"extra": 1}, "extra"),
    ({"hyperparameters": {"lr": 0.02, "momentun": 0.9}}, "momentun"),
    ({"hyperparameters": {"lr": -1.0}}, "lr"),
    ({"hyperparameters": {"momentum": 1.5}}, "momentum"),
    ({"param_groups": [{"match": "vector", "optimizer": "adamw", "hyperparameters": {"betas": [0.9, 1.5]}}]},
     "betas"),
    ({"param_groups": [{"match": "vector", "optimizer": "sgdx"}]}, "param_groups[0].optimizer"),
    ({"param_groups": [{"match": "vector", "optimiser": "adamw"}]}, "optimiser"),
    ({"param_groups": [{"optimizer": "adamw"}]}, "match"),
    ({"param_groups": [{"match": "vector(", "optimizer": "adamw"}]}, "param_groups[0].match"),
    ({"param_groups": [{"match": "matrix", "hyperparameters": {"lr": -0.5}}]}, "lr"),
    ({"hyperparameters": {"lr": float("inf")}}, "lr=inf must be finite"),
    ({"hyperparameters": {"lr": "fast"}}, "lr='fast' must be a number"),
    ({"hyperparameters": {"ns_steps": True}}, "ns_steps=True must be an integer"),
    ({"hyperparameters": {"nesterov": 1}}, "nesterov=1 must be true or false"),
    ({"param_groups": [{"match": "vector", "optimizer": "adamw", "hyperparameters": {"betas": 0.9}}]},
     "betas=0.9 must be a list"),
    ({"param_groups": [{"match": "vector", "optimizer": 3}]}, "param_groups[0].optimizer must name"),
    ({"param_groups": [{"match": "embeddings", "optimizer": "adamw"}]},  # a typo would silently route nothing
     "param_groups[0].match 'embeddings' matches no role"),
    ({"param_groups": [{"match": "embeddings|head", "optimizer": "adamw"}]},  # half a rule routing nothing
     "param_groups[0].match 'embeddings|head': its alternative 'embeddings' matches no role"),
])
def test_bad_configs_are_rejected_naming_the_key(tmp_path, change, key):
    doc = {**DOC, **change}
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        pc.validate(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="bad.yaml"):
        precondtune.build_optimizer(torch.nn.Linear(2, 2), path)
    with pytest.raises(ConfigError):
        pc.write(doc, tmp_path / "never.yaml")
    assert not (tmp_path / "never.yaml").exists()


def test_not_a_mapping_and_missing_file_are_clear(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        pc.load(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        pc.load(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        pc.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory; give the config file in it"):
        pc.load(tmp_path)


def test_a_routing_the_model_cannot_take_names_the_file(tmp_path):
    path = tmp_path / "muon.yaml"  # vectors sent to Muon, which updates matrices
    path.write_text(yaml.safe_dump({**DOC, "param_groups": [{"match": "vector", "optimizer": "muon"}]}))
    with pytest.raises(ConfigError, match=r"muon\.yaml: .*vector"):
        precondtune.build_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), path)


@pytest.mark.parametrize("name", ["muon", "galore"])
def test_hand_made_param_groups_with_vectors_fail_at_construction_naming_the_fix(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    groups = [{"params": [p for p in model.parameters() if p.ndim == 2]},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    with pytest.raises(ConfigError, match=rf"param group 1 holds a parameter of shape \(8,\).*build\('{name}', model\)"):
        precondtune.optim.build(name, groups)
    precondtune.optim.build(name, model)  # the model routes its vectors to AdamW


def test_iso_adam_without_the_model_names_itself():
    with pytest.raises(ConfigError, match=r"build\('iso-adam', model\)"):
        precondtune.optim.build("iso-adam", list(torch.nn.Linear(4, 4).parameters()))


def test_write_is_atomic(tmp_path, monkeypatch):
    path = pc.write(DOC, tmp_path / "c.yaml")
    before = path.read_text()

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        pc.write({**DOC, "hyperparameters": {"lr": 0.05}}, path)
    assert path.read_text() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temp file left behind


def test_name_rules_and_main_overrides_route_per_parameter():
    doc = {"schema_version": 1, "optimizer": "muon", "hyperparameters": {"lr": 0.02},
           "param_groups": [{"match": "matrix", "name": r"^0\.weight$", "hyperparameters": {"lr": 0.01}}]}
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = precondtune.build_optimizer(model, doc)
    lrs = {g["names"][0]: g["lr"] for part in opt.parts for g in part.param_groups if g["role"] == "matrix"}
    assert lrs == {"0.weight": 0.01, "1.weight": 0.02}


@pytest.mark.parametrize(("name", "hp"), [
    ("adafactor", {"d": float("inf")}),  # no update clipping
    ("hfac", {"clip_threshold": float("inf")}),
    ("shampoo", {"max_precond_dim": float("inf")}),  # no limit
    ("adamw", {"foreach": None}),  # torch's "auto"
    ("adamw", {"lr": torch.tensor(1e-3)}),  # torch takes a tensor lr
    ("adamw", {"betas": np.array([0.9, 0.99])}),
    ("muon", {"nesterov": np.bool_(True)}),
])
def test_values_torch_accepts_pass_the_type_checks(name, hp):
    po.get_spec(name).config(**hp)


def test_numpy_values_are_written_and_built_as_python_numbers(tmp_path):
    """Values from pandas or numpy (np.float64, np.int32, arrays) reach configs: they are checked and written as
    plain numbers (YAML could not write np.float64; the Configs' own checks rejected np.int32)."""
    doc = {"schema_version": 1, "optimizer": "sophia",
           "hyperparameters": {"lr": np.float64(1e-3), "k": np.int32(10), "betas": np.array([0.96, 0.99])}}
    path = pc.write(doc, tmp_path / "np.yaml")
    back = yaml.safe_load(path.read_text())["hyperparameters"]
    assert back["lr"] == 1e-3 and back["k"] == 10 and back["betas"] == [0.96, 0.99]
    assert po.get_spec("sophia").config(k=np.int32(10)).k == 10


@pytest.mark.parametrize("pattern", ["embedding|head|vector", "(embeddings|embedding)|head", "[|a-z]+", r"vect\w+|head",
                                     "vec.*|mat(rix)?", "(?i)EMBEDDING|HEAD", "(?x) embedding | head", "[^]|]+|head"])
def test_match_alternatives_inside_groups_classes_and_escapes_are_not_split(pattern):
    pc.validate({**DOC, "param_groups": [{"match": pattern, "optimizer": "adamw"}]})
