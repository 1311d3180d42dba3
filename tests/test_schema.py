"""One config schema: the JSON Schema `rnnkit schema` writes, the committed copy, the shipped
configs, the reference's descriptions, and `--help` that reads whole at any width."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.cli.schema import schema_text
from rnnkit.config import TASKS, load_config
from rnnkit.config.schema import field_docs, json_schema, key_rows, sections

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "bench").glob("*.yaml"))
runner = CliRunner()


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_the_commands_output(tmp_path):
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["schema", "-o", str(out)])
    assert result.exit_code == 0, result.output
    committed = (ROOT / "configs" / "rnnkit.schema.json").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed == schema_text(), \
        "configs/rnnkit.schema.json is stale: run `rnnkit schema -o configs/rnnkit.schema.json`"
    assert runner.invoke(app, ["schema"]).output == committed


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_points_at_the_schema_and_validates(path, validator):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, f"{path.name} must start with the yaml-language-server line"
    assert (path.parent / match.group(1)).resolve() == (ROOT / "configs" / "rnnkit.schema.json")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("bad, where", [
    ({"task": "lm", "model": {"hidden_sise": 4}}, "model"),                  # unknown key
    ({"task": "translation", "model": {"decoder": {"attention": "luong"}}}, "model.decoder.attention"),
    ({"task": "tagging", "train": {"metric": "valid_bleu"}}, "train.metric"),   # another task's metric
    ({"model": {"cutoffs": "many"}}, "model.cutoffs"),                       # no task: lm
    ({"task": "forecast", "data": {"horizon": 0}}, "data.horizon"),          # below its bound
    ({"task": "lm", "train": {"device": "gpu"}}, "train.device"),
    ({"task": "summarise"}, "task"),
])
def test_the_schema_refuses_what_the_loader_refuses(bad, where, validator, tmp_path):
    errors = list(validator.iter_errors(bad))
    assert errors and any(".".join(map(str, e.path)) in (where, where.rsplit(".", 1)[0]) for e in errors), \
        [(list(e.path), e.message) for e in errors]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match=re.escape(where.split(".")[0])):
        load_config(path)


def test_defaults_and_bounds_come_from_the_dataclasses():
    defs = json_schema()["$defs"]
    hidden = defs["lm.ModelConfig"]["properties"]["hidden_size"]
    assert hidden["default"] == 256 and hidden["minimum"] == 1 and hidden["type"] == "integer"
    lr = defs["core.TrainConfig"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and lr["default"] == 0.002
    assert defs["translation.DecoderConfig"]["properties"]["attention"]["enum"] == ["none", "dot", "general",
                                                                                    "additive"]


def test_every_key_of_every_task_has_a_description():
    undocumented = [f"{title}: {row.key}" for title, _, rows in sections() for row in rows
                    if len(row.description) < 8]
    assert not undocumented, f"write a docstring under these fields: {undocumented}"
    for schema in TASKS.values():      # and the reference covers every field of every section
        for cls in (schema.data, schema.model):
            assert {f.name for f in dataclasses.fields(cls)} <= set(field_docs(cls))


def test_key_rows_flatten_nested_sections():
    keys = [r.key for r in key_rows(TASKS["translation"].model)]
    assert "encoder.hidden_size" in keys and "decoder.attention" in keys and "encoder" not in keys


def _commands(group, prefix=()):
    """Every command's name path, subgroups included."""
    import typer.main

    click_group = typer.main.get_command(group)
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            for sub in cmd.commands:
                yield (*prefix, name, sub), cmd.commands[sub]
        else:
            yield (*prefix, name), cmd


def test_help_summaries_read_whole_at_200_columns():
    """A docstring with hard line breaks breaks each summary mid-sentence in `--help`."""
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"}, terminal_width=200).output
    for path, cmd in _commands(app):
        summary = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert summary, f"{' '.join(path)} has no help"
        if len(path) == 1:
            assert any(summary in line for line in out.splitlines()), f"'{path[0]}' summary wraps: {summary!r}"
        sub = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"},
                            terminal_width=200).output
        assert any(summary in line for line in sub.splitlines()), f"'{' '.join(path)} --help' wraps: {summary!r}"
