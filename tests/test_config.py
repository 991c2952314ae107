"""Config schema: YAML + dotted overrides, strict validation with one-line messages."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import pytest
import yaml

from ofer.config import (
    ExpGenTrainConfig,
    IdGenTrainConfig,
    IdRankTrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    resolve_path,
    save_config,
)
from ofer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_roundtrip_through_yaml(tmp_path):
    cfg = IdGenTrainConfig()
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(IdGenTrainConfig, tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(IdGenTrainConfig, config_to_dict(cfg)) == cfg


def test_overrides_types_and_nesting(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 7\ndiffusion:\n  lr: 1e-4\n")
    cfg = load_config(IdGenTrainConfig, p, ["data.train=[A,B]", "arcface.weights=null",
                                             "optim.grad_clip=1", "seed=3"])
    assert cfg.train.max_steps == 7
    assert cfg.train.log_every == 50  # default kept next to an overridden sibling
    assert cfg.diffusion.lr == pytest.approx(1e-4) and isinstance(cfg.diffusion.lr, float)
    assert cfg.data.train == ["A", "B"]
    assert cfg.arcface.weights is None
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.seed == 3


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["train.max_step=3"])
    msg = str(e.value)
    assert msg.startswith("unknown config key 'train.max_step'; valid keys in 'train': max_steps, ")
    assert "\n" not in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim.lr'; valid keys in 'optim': "
                                          r"weight_decay, betas, eps, grad_clip, warmup_steps, "
                                          r"lr_schedule$"):
        load_config(IdGenTrainConfig, p)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"^unknown config key 'foo'; valid keys in the top level: "
                                          r"data_root, run_dir, seed, resume, "):
        load_config(IdGenTrainConfig, None, ["foo=1"])


def test_wrong_types_exact_messages():
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["train.max_steps=abc"])
    assert str(e.value) == "config key 'train.max_steps' expects int, got str 'abc'"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["resume=1"])
    assert str(e.value) == "config key 'resume' expects bool (true/false), got int 1"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["diffusion.lr=fast"])
    assert str(e.value) == "config key 'diffusion.lr' expects float, got str 'fast'"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["data.train=LYHM"])
    assert str(e.value) == "config key 'data.train' expects list of str, got str 'LYHM'"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["train.precision=fp16"])
    assert str(e.value) == ("config key 'train.precision' expects one of 'auto', 'fp32', 'bf16', "
                            "got 'fp16'")
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["train=3"])
    assert str(e.value) == "config key 'train' expects a mapping, got int 3"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["seed.x=3"])
    assert str(e.value) == "config key 'seed' is a int, it has no sub-keys"


def test_bad_values_exact_messages():
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["data.actors_per_batch=0"])
    assert str(e.value) == "config key 'data.actors_per_batch' must be >= 1, got 0"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["data.occlusion.prob=1.5"])
    assert str(e.value) == "config key 'data.occlusion.prob' must be in [0, 1], got 1.5"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["n_shape=100"])
    assert str(e.value) == "config key 'denoiser.dims' must start with n_shape=100, got [300, 50, 10]"
    with pytest.raises(ConfigError) as e:
        load_config(ExpGenTrainConfig, None, ["n_exp=20"])
    assert str(e.value) == "config key 'denoiser.dims' must start with n_exp + 3 = 23, got [53, 25, 10]"
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["arcface.input_size=56"])
    assert str(e.value) == "config key 'arcface.input_size' must be a multiple of 16 in [16, 112], got 56"
    with pytest.raises(ConfigError) as e:
        load_config(IdRankTrainConfig, None, ["ranker.mean_scale=-0.5"])
    assert str(e.value) == "config key 'ranker.mean_scale' must be >= 0, got -0.5"


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'train.max_steps' must look like key.sub=value$"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match=r"^config file not found: "):
        load_config(IdGenTrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping, got list$"):
        load_config(IdGenTrainConfig, bad)


def test_resolve_path(tmp_path):
    assert resolve_path("data", "a/b.pkl") == Path("data/a/b.pkl")
    assert resolve_path("data", tmp_path / "x") == tmp_path / "x"
    assert resolve_path("data", None) is None


@pytest.mark.parametrize(
    "name,schema",
    [("idgen", IdGenTrainConfig), ("expgen", ExpGenTrainConfig), ("idrank", IdRankTrainConfig)],
)
def test_shipped_configs_load_and_match_paper(name, schema):
    cfg = load_config(schema, REPO / "configs" / f"{name}.yaml")
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert not any(
        str(v).startswith("/") for v in _leaves(yaml.safe_load(text))
    )
    if name == "idgen":
        assert (cfg.data.actors_per_batch, cfg.data.images_per_actor) == (16, 4)
        assert cfg.diffusion.lr == 1e-3 and cfg.arcface.lr == 1e-4
        assert cfg.optim.weight_decay == 1e-4 and cfg.diffusion.loss == "l1"
        assert (cfg.diffusion.num_steps, cfg.diffusion.beta_1, cfg.diffusion.beta_T) == (1000, 1e-4, 1e-2)
        assert cfg.denoiser.dims == [300, 50, 10] and cfg.arcface.freeze == "l4"
    if name == "expgen":
        assert cfg.denoiser.dims[0] == 53 and cfg.n_exp == 50
        # the released pipeline's sampled-jaw factor, in the file and as the schema default
        assert cfg.jaw_scale == 0.5 and ExpGenTrainConfig().jaw_scale == 0.5
        assert cfg.diffusion.lr == 1e-3 and cfg.farl.lr == 1e-4
    if name == "idrank":
        assert cfg.num_samples == 100 and cfg.ranker.lr == 1e-6
    # the demo variant (package data of ofer.world) loads too
    from ofer.demo import config_file

    with resources.as_file(config_file(name)) as demo:
        load_config(schema, demo)


def _leaves(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)
    else:
        yield node


@pytest.mark.parametrize("override", ["diffusion.lr=.inf", "diffusion.lr=-.inf", "diffusion.lr=.nan",
                                      "diffusion.lr=1e999", "arcface.lr=inf", "diffusion.cond_scale=nan",
                                      "optim.grad_clip=.inf", "data.occlusion.area=[0.1, .inf]",
                                      "diffusion.target_mean=[0.0, .nan]"])
def test_non_finite_floats_are_refused_with_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}(\[\d\])?' must be a finite number"):
        load_config(IdGenTrainConfig, None, [override])


@dataclass
class Scaled:
    scale: Optional[float] = None


def test_non_finite_in_a_file_and_in_an_optional_float(tmp_path):
    (tmp_path / "c.yaml").write_text("diffusion:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="'diffusion.lr' must be a finite number"):
        load_config(IdGenTrainConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="'scale' must be a finite number"):
        load_config(Scaled, None, ["scale=.inf"])
    assert load_config(Scaled, None, ["scale=null"]).scale is None
    assert load_config(IdGenTrainConfig, None, ["diffusion.lr=2e-4"]).diffusion.lr == 2e-4


def test_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run_dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as excinfo:
        load_config(IdGenTrainConfig, path)
    assert str(path) in str(excinfo.value) and "UTF-8" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    path.write_bytes("\ufeffrun_dir: runs/caf\xe9\n".encode("utf-8"))  # a byte-order mark is fine
    assert load_config(IdGenTrainConfig, path).run_dir == "runs/caf\xe9"
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError):
        load_config(IdGenTrainConfig, folder)
