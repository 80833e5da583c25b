"""Recipe knobs: declared once on the pass configs, validated by one code path for the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import edgecompress
from edgecompress.cli import main
from edgecompress.errors import ConfigError
from edgecompress.recipes import RECIPES, RecipeOptions, knobs, make_recipe
from edgecompress.search import grid


def test_every_knob_is_a_flag_and_every_flag_a_knob() -> None:
    build = main.commands["build"]
    flags = {opt for p in build.params for opt in p.opts}
    for knob in knobs().values():
        assert knob.flag in flags
    assert {"--codebook-bits", "--prune-ffn", "--int4-method", "--low-rank-energy"} <= {
        k.flag for k in knobs().values()}


@pytest.mark.parametrize(("values", "api", "cli"), [
    ({"codebook_bits": 9}, "codebook_bits must be between 2 and 8", "--codebook-bits must be between 2 and 8"),
    ({"int4_method": "awq"}, "unknown int4_method 'awq'", "unknown --int4-method 'awq'"),
    ({"block_size": 24}, "block_size must be a power of two", "--block-size must be a power of two"),
    ({"prune_ffn": 1.0}, "prune_ffn must be in [0, 1)", "--prune-ffn must be in [0, 1)"),
    ({"prune_ffn": float("nan")}, "prune_ffn must be a finite number", "--prune-ffn must be a finite number"),
    ({"low_rank_energy": float("inf")}, "low_rank_energy must be a finite", "--low-rank-energy must be a finite"),
    ({"codebook_bits": 4.5}, "codebook_bits must be an integer", "--codebook-bits must be an integer"),
])
def test_api_and_cli_share_the_validation_and_name_their_own_spelling(values: dict, api: str, cli: str) -> None:
    with pytest.raises(ConfigError) as e:
        RecipeOptions(**values)
    assert api in e.value.one_line()
    with pytest.raises(ConfigError) as e:
        RecipeOptions.from_flags(values)
    assert cli in e.value.one_line()


def test_a_knob_the_recipe_does_not_read_is_an_error() -> None:
    with pytest.raises(ConfigError, match="codebook_bits does not apply to recipe 'int8-dynamic'"):
        make_recipe("int8-dynamic", RecipeOptions(codebook_bits=3))
    with pytest.raises(ConfigError, match="--prune-recovery does nothing without --prune-ffn or --prune-heads"):
        make_recipe("int4", RecipeOptions.from_flags({"prune_recovery": "bias"}))
    with pytest.raises(ConfigError, match="codebook_keep_float does not apply to recipe 'codebook' for "
                                          "text-generation-with-past"):
        make_recipe("codebook", RecipeOptions(codebook_keep_float=2), task="text-generation-with-past")
    # a structural knob composes with any recipe; a recipe's own knob with its recipe
    assert [p.name for p in make_recipe("int4", RecipeOptions(prune_ffn=0.2, int4_method="hqq")).passes] == \
        ["prune", "int4"]
    assert make_recipe("int8-dynamic", RecipeOptions(prune_ffn=0.0)).passes[0].name == "int8-dynamic"


def test_cli_refuses_a_flag_the_recipe_ignores_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["build", "-t", "host", "--recipe", "int8-dynamic", "--codebook-bits", "3",
                                  "--out", str(out)])
    assert r.exit_code == ConfigError.exit_code, r.output
    assert r.output.strip().splitlines() == [
        "error: --codebook-bits does not apply to recipe 'int8-dynamic' (it applies to codebook; leave it out)"]
    assert not out.exists()
    r = CliRunner().invoke(main, ["build", "-t", "host", "--recipe", "auto", "--codebook-bits", "3",
                                  "--out", str(out)])
    assert r.exit_code == ConfigError.exit_code and "does not apply to recipe 'auto'" in r.output


def test_the_api_refuses_it_too_naming_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^codebook_bits does not apply to recipe 'int8-dynamic'"):
        edgecompress.build(target="host", recipe="int8-dynamic", out=tmp_path / "b", codebook_bits=3)
    with pytest.raises(ConfigError, match="unknown recipe option 'codebook_bit'"):
        edgecompress.build(target="host", recipe="codebook", out=tmp_path / "b", codebook_bit=3)
    assert not (tmp_path / "b").exists()


def test_the_search_grid_is_derived_from_the_registry() -> None:
    names = [c.name for c in grid()]
    assert names == ["fp32", "fp16", "int8-dynamic", "int8-static", "int8-mixed", "int4", "int4[int4-method=gptq]",
                     "codebook[codebook-bits=6]", "codebook[codebook-bits=4]",
                     "codebook[codebook-bits=4,codebook-keep-float=6]", "codebook[codebook-bits=3]",
                     "int8-dynamic[prune-ffn=0.25]", "codebook[codebook-bits=4,prune-ffn=0.25]",
                     "int4[prune-ffn=0.25]"]
    assert set(RECIPES) == {c.recipe for c in grid()}
