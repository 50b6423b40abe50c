"""The run-configuration schema: defaults, overrides, path lookup, and every error path.

Every error must be a ConfigError whose message names the offending key and the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from rj_plugin import cli
from rj_plugin.config import SCHEMA, TASK_OPTIONS, TASKS, load_config, parse_override
from rj_plugin.demo import DEMO_CONFIG
from rj_plugin.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path: Path, raw: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def _base(**sections: dict) -> dict:
    raw = {"model": {"name": "digits-relu"}, "task": {"name": "jacobian"}}
    for key, val in sections.items():
        raw[key] = val
    return raw


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _base()))
    assert cfg.task == "jacobian"
    for section, keys in SCHEMA.items():
        for key in keys:
            assert key in cfg[section], f"{section}.{key} missing from the resolved config"
    for key in TASK_OPTIONS["jacobian"]:
        assert key in cfg["task"]
    assert cfg["general"]["dtype"] == "float64" and cfg["specification"]["norm"] == "inf"
    assert cfg["specification"]["output"] == "all"  # "auto" resolved
    assert cfg["bounds"]["method"] == "crown" and cfg["jacobian"]["method"] == "recurjac"


def test_task_dependent_defaults(tmp_path: Path) -> None:
    rob = load_config(_write(tmp_path, _base(task={"name": "robustness"})))
    assert rob["specification"]["output"] == "margins"
    assert rob["task"]["start_eps"] == rob["specification"]["eps"] == 0.01
    stat = load_config(_write(tmp_path, _base(task={"name": "stationary"},
                                              specification={"norm": 2})))
    assert stat["task"]["max_radius"] == 10.0
    glob = load_config(_write(tmp_path, _base(task={"name": "global-lipschitz"},
                                              jacobian={"method": "fastlip"})))
    assert glob["task"]["methods"] == ["fastlip"]


def test_values_are_normalised(tmp_path: Path) -> None:
    raw = _base(specification={"norm": ".inf", "eps": "1e-3"})
    raw["specification"]["norm"] = math.inf
    cfg = load_config(_write(tmp_path, raw))
    assert cfg["specification"]["norm"] == "inf" and cfg["specification"]["eps"] == 1e-3
    cfg = load_config(_write(tmp_path, _base(specification={"norm": "l2"})))
    assert cfg["specification"]["norm"] == "2"
    cfg = load_config(_write(tmp_path, _base(specification={"norm": 1})))
    assert cfg["specification"]["norm"] == "1"


def test_overrides_are_applied_and_recorded(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    cfg = load_config(path, ["data.end=3", "specification.norm=2", "task.save_bounds=false",
                             "model.input_shape=[64]", "general.results_dir=out"])
    assert cfg["data"]["end"] == 3 and cfg["specification"]["norm"] == "2"
    assert cfg["task"]["save_bounds"] is False and cfg["model"]["input_shape"] == [64]
    assert cfg.overrides == ["data.end=3", "specification.norm=2", "task.save_bounds=false",
                             "model.input_shape=[64]", "general.results_dir=out"]
    # an override can create a section and switch the task
    cfg = load_config(path, ["task.name=lipschitz", "bounds.method=ibp"])
    assert cfg.task == "lipschitz" and cfg["bounds"]["method"] == "ibp"
    assert parse_override("a.b= [1, 2]") == ("a", "b", [1, 2])


def test_relative_paths_resolve_next_to_the_config(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "C.npy", np.eye(10))
    raw = _base(specification={"output": "matrix", "matrix": "data/C.npy"})
    path = _write(tmp_path / "configs", raw)
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert cfg.paths["specification.matrix"] == (tmp_path / "data" / "C.npy").resolve()


def test_vnnlib_glob_is_sorted_naturally(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        (tmp_path / f"prop_{i}.vnnlib").write_text("")
    raw = _base(data={"source": "vnnlib", "path": str(tmp_path / "prop_*.vnnlib")})
    cfg = load_config(_write(tmp_path, raw))
    assert [Path(p).name for p in cfg.paths["data.path"]] == [
        "prop_1.vnnlib", "prop_2.vnnlib", "prop_10.vnnlib"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        if "../shared" in str(exc) and not (REPO.parent / "shared" / "data").is_dir():
            pytest.skip("the shared VNN-COMP data is not available")
        raise
    assert cfg.task in TASKS


def test_every_task_has_a_shipped_config_on_the_demo_model() -> None:
    tasks = set()
    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text())
        if raw.get("model", {}).get("name", "").startswith("digits"):
            tasks.add(raw["task"]["name"])
    assert tasks == set(TASKS)


def test_demo_yaml_equals_the_embedded_demo_config() -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert raw == DEMO_CONFIG


def test_readme_documents_every_key() -> None:
    text = (REPO / "configs" / "README.md").read_text()
    for section, keys in SCHEMA.items():
        assert f"`{section}`" in text
        for key in keys:
            assert f"| `{key}` |" in text, f"{section}.{key} not in configs/README.md"
    for task, keys in TASK_OPTIONS.items():
        assert f"#### task `{task}`" in text
        for key in keys:
            assert f"| `{key}` |" in text, f"task {task}: {key} not in configs/README.md"


# -- error paths ------------------------------------------------------------------------------

ERRORS = [
    # (id, raw config (None: the base), overrides, key named in the message)
    ("unknown-section", {**_base(), "solver": {}}, [], "solver"),
    ("unknown-key", _base(general={"devcie": "cpu"}), [], "general.devcie"),
    ("unknown-task-option", _base(task={"name": "jacobian", "lipsteps": 3}), [], "task.lipsteps"),
    ("option-of-other-task", _base(task={"name": "lipschitz", "output_index": 1}), [],
     "task.output_index"),
    ("section-not-mapping", _base(general=[1, 2]), [], "general"),
    ("missing-task", {"model": {"name": "digits-relu"}}, [], "task"),
    ("missing-task-name", _base(task={"output_index": 0}), [], "task.name"),
    ("unknown-task", _base(task={"name": "verify"}), [], "task.name"),
    ("task-not-mapping", {**_base(), "task": "jacobian"}, [], "task"),
    ("bool-for-int", _base(general={"seed": True}), [], "general.seed"),
    ("float-for-int", _base(data={"end": 2.5}), [], "data.end"),
    ("negative-int", _base(general={"seed": -1}), [], "general.seed"),
    ("string-for-bool", _base(general={"plots": "yes"}), [], "general.plots"),
    ("bad-float", _base(specification={"eps": "small"}), [], "specification.eps"),
    ("negative-eps", _base(specification={"eps": -0.1}), [], "specification.eps"),
    ("nan-eps", _base(specification={"eps": float("nan")}), [], "specification.eps"),
    ("inf-eps", _base(specification={"eps": float("inf")}), [], "specification.eps"),
    ("bad-norm", _base(specification={"norm": 3}), [], "specification.norm"),
    ("bad-choice", _base(general={"dtype": "float16"}), [], "general.dtype"),
    ("bad-preact", _base(bounds={"method": "beta-crown"}), [], "bounds.method"),
    ("bad-jacobian", _base(jacobian={"method": "exact"}), [], "jacobian.method"),
    ("zero-lr", _base(bounds={"alpha_lr": 0}), [], "bounds.alpha_lr"),
    ("zero-iterations", _base(bounds={"alpha_iterations": 0}), [], "bounds.alpha_iterations"),
    ("empty-string", _base(general={"device": ""}), [], "general.device"),
    ("bad-shape", _base(model={"name": "digits-relu", "input_shape": [0]}), [],
     "model.input_shape"),
    ("zero-std", _base(model={"name": "digits-relu", "std": 0}), [], "model.std"),
    ("bad-std-item", _base(model={"name": "digits-relu", "std": [1, -1]}), [], "model.std"),
    ("model-name-and-path", _base(model={"name": "digits-relu", "path": "x.onnx"}), [],
     "model.name"),
    ("no-model", {"task": {"name": "jacobian"}}, [], "model.name"),
    ("unknown-demo", _base(model={"name": "digits-gelu"}), [], "model.name"),
    ("missing-model-file", {"model": {"path": "nowhere/net.onnx"}, "task": {"name": "jacobian"}},
     [], "model.path"),
    ("npz-without-path", _base(data={"source": "npz"}), [], "data.path"),
    ("digits-with-path", _base(data={"source": "digits", "path": "x.npz"}), [], "data.path"),
    ("missing-data-file", _base(data={"source": "npz", "path": "none.npz"}), [], "data.path"),
    ("glob-no-match", _base(data={"source": "vnnlib", "path": "no/prop_*.vnnlib"}), [],
     "data.path"),
    ("indices-and-start", _base(data={"indices": [1, 2], "start": 1}), [], "data.indices"),
    ("duplicate-indices", _base(data={"indices": [1, 1]}), [], "data.indices"),
    ("negative-index", _base(data={"indices": [-1]}), [], "data.indices"),
    ("empty-indices", _base(data={"indices": []}), [], "data.indices"),
    ("end-before-start", _base(data={"start": 3, "end": 3}), [], "data.end"),
    ("random-low-high", _base(data={"source": "random", "low": 1, "high": 0}), [], "data.high"),
    ("matrix-without-file", _base(specification={"output": "matrix"}), [],
     "specification.matrix"),
    ("file-without-matrix", _base(specification={"output": "all", "matrix": "C.npy"}), [],
     "specification.matrix"),
    ("target-without-margins", _base(specification={"output": "all", "target": 1}), [],
     "specification.target"),
    ("box-with-l2", _base(specification={"region": "box", "norm": 2}), [],
     "specification.norm"),
    ("domain-with-ball", _base(specification={"domain": [0, 1]}), [], "specification.domain"),
    ("bad-domain", _base(specification={"region": "box", "domain": [1, 0]}), [],
     "specification.domain"),
    ("search-on-box", _base(task={"name": "robustness"}, specification={"region": "box"}), [],
     "specification.region"),
    ("robustness-all-outputs", _base(task={"name": "robustness"},
                                     specification={"output": "all"}), [],
     "specification.output"),
    ("search-start-zero", _base(task={"name": "stationary"}, specification={"eps": 0}), [],
     "task.start_eps"),
    ("bad-robustness-method", _base(task={"name": "robustness", "methods": ["beta"]}), [],
     "task.methods"),
    ("duplicate-methods", _base(task={"name": "robustness", "methods": ["crown", "crown"]}), [],
     "task.methods"),
    ("log-range-reversed", _base(task={"name": "lipschitz", "log_start": 0, "log_end": -2}), [],
     "task.log_end"),
    ("bad-direction", _base(task={"name": "monotonicity", "direction": "up"}), [],
     "task.direction"),
    ("override-bad-value", _base(), ["specification.eps=-2"], "specification.eps"),
    ("override-unknown-key", _base(), ["general.colour=red"], "general.colour"),
]


@pytest.mark.parametrize("raw,overrides,key", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_name_the_key_and_the_file(tmp_path: Path, raw: dict, overrides: list[str],
                                          key: str) -> None:
    path = _write(tmp_path, raw, "bad-config.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert key in msg, msg
    assert "bad-config.yaml" in msg, msg


@pytest.mark.parametrize("text,fragment", [
    ("a: [1, 2", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
    ("just a string", "expected a mapping of sections"),
])
def test_malformed_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, text, "broken.yaml")
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(path)
    assert "broken.yaml" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("text,fragment", [
    ("general.seed", "expected section.key=value"),
    ("seed=1", "must be section.key"),
    ("a.b.c=1", "must be section.key"),
    ("solver.x=1", "unknown section"),
    ("general.seed=[1", "cannot read the value"),
])
def test_bad_overrides(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, _base())
    with pytest.raises(ConfigError, match=fragment):
        load_config(path, [text])


def test_runtime_config_errors_name_the_key(tmp_path: Path) -> None:
    """Errors only detectable with the model or data loaded are still ConfigErrors."""
    from rj_plugin.tasks.runner import run

    cases = [
        (_base(data={"indices": [5000]}), "data.indices"),
        (_base(data={"start": 400}), "data.start"),
        (_base(task={"name": "jacobian", "output_index": 10}), "task.output_index"),
        (_base(model={"name": "digits-relu", "mean": [0.0, 1.0]}), "model.mean"),
        (_base(model={"name": "digits-relu", "input_shape": [8, 8]}), "model.input_shape"),
        (_base(task={"name": "monotonicity", "features": [64]}), "task.features"),
    ]
    for raw, key in cases:
        raw.setdefault("general", {})["results_dir"] = str(tmp_path / "out")
        path = _write(tmp_path, raw, "late.yaml")
        with pytest.raises(ConfigError) as info:
            run(load_config(path))
        assert key in str(info.value) and "late.yaml" in str(info.value), str(info.value)


def test_cli_reports_config_errors(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, _base(general={"seed": "x"}), "cli.yaml")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rj: error:") and "general.seed" in err and "cli.yaml" in err
    assert cli.main(["run", str(path), "--set", "general.seed=1", "model.name=nope"]) == 2
    assert "model.name" in capsys.readouterr().err
