"""Configuration: file, then MACE_* environment, then flags; bad keys are named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mace.config import ConfigError, load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.toml"


def test_file_env_and_flag_precedence() -> None:
    environ = {"MACE_ENGINE__MAX_NUM_SEQS": "7", "MACE_MODEL__DTYPE": "bfloat16", "MACE_DATA_DIR": "/tmp/d"}
    config = load_config(TINY, {"model": {"dtype": "float32"}}, environ=environ)
    assert config.model.name == "builtin:tiny"  # from the file
    assert config.engine.max_num_seqs == 7  # from the environment, typed
    assert config.model.dtype == "float32"  # the flag wins over the environment
    assert config.data_dir == Path("/tmp/d")


def test_shipped_default_file_equals_the_code_defaults() -> None:
    """One source of defaults: `mace serve` with no flags is the server `--config configs/default.toml` runs."""
    from_file = load_config(ROOT / "configs" / "default.toml", environ={})
    assert from_file == load_config(environ={})
    assert from_file.model.name == "builtin:smollm2" and from_file.train.policy == "mace"


def test_every_key_in_the_default_file_is_a_code_default() -> None:
    """A key in default.toml whose value differs from the code would make the equality above fail; this
    one names it, so the file and the code are fixed together."""
    defaults = load_config(environ={}).model_dump()
    for section, values in tomllib.loads((ROOT / "configs" / "default.toml").read_text()).items():
        for key, value in values.items():
            expected = defaults[section][key]
            assert (list(expected) if isinstance(expected, tuple) else expected) == value, f"{section}.{key}"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"MACE_ENGINE__MAX_NUM_SEQS": "lots"}, "MACE_ENGINE__MAX_NUM_SEQS"),
        ({"MACE_ENGINE__NO_SUCH_KEY": "1"}, "engine.no_such_key"),
        ({"MACE_MODEL__DTYPE": "float8"}, "model.dtype"),
        ({"MACE_NOSECTION__KEY": "1"}, "nosection"),
    ],
)
def test_bad_values_name_the_key(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(TINY, environ=environ)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})


def test_default_directories_are_expanded() -> None:
    config = load_config(environ={})
    assert "~" not in str(config.cache_dir) and "~" not in str(config.data_dir)
    assert config.cache_dir == Path("~/.cache/mace").expanduser()
