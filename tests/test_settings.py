"""One definition per option: every front end derives from dbmagic.settings, and they agree."""

from __future__ import annotations

import html
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from traitlets import TraitError

from dbmagic import ConfigurationError, settings
from dbmagic.frontends import history as _history
from dbmagic.frontends.line import split_options
from dbmagic.frontends.magic import DbLLM
from dbmagic.frontends.panel import PROXY, Panel

from .conftest import CHAT, CLUSTER, CUSTOM, PORT

ROOT = Path(__file__).resolve().parent.parent

# A value other than the default for every setting: a new setting needs one here, and then every
# test below checks it.
SAMPLES = {
    "endpoint": CHAT, "cluster_id": CLUSTER, "port": PORT, "org_id": "42", "temperature": 0.25,
    "max_tokens": 20, "n": 2, "stop": ["\n\n", "END"], "extra_params": {"top_p": 0.9, "tags": ["a"], "style": "terse"},
    "system": "Line one\nline two", "task": "completions", "timeout": 30.0, "transform_input": "concise",
    "transform_output": "shout", "dry_run": True, "output": "answer", "format": "text", "insert": True,
    "stream": False, "chat": True, "raw": True, "over": "tickets", "column": "summary", "send_missing": True, "concurrency": 4, "rows_per_request": 50,
    "attach": ["receipt", "scans/form.pdf"], "prompt": "prompts:/summarise/2", "vars": {"audience": "engineers", "n": 3}, "judge": "polite,Safety", "checkpoint": "/Volumes/main/default/work/tickets", "max_tokens_total": 50000, "max_cost": 2.5, "cache_mode": "always", "background": True,
    "expect": "expected", "compare": f"{CHAT},local-completions", "repeat": 3,
    "schema": "label: 'pos'|'neg', score: float", "schema_retries": 2, "tools": ["weather,lookup"], "run_tools": True,
    "max_steps": 3,
    "max_tool_runs": 7, "service_tier": "priority",
    "shared_checkpoint": True,
    "fail_on_error": True,
    "max_answer_mb": 2.5,
}
TRANSFORMS = ("def shout(value):\n    return value.upper()\n"
              "def concise(**request):\n    request['prompt'] += ' Be concise.'\n    return request\n")


def posts(workspace):
    return [r for r in workspace.requests if r.method == "POST"]


def test_every_setting_has_a_sample():
    assert set(SAMPLES) == set(settings.BY_NAME)


@pytest.mark.parametrize("s", settings.SETTINGS, ids=lambda s: s.name)
def test_every_setting_has_a_trait_a_flag_a_control_and_a_cell_spelling(s, shell):
    magics = next(c for c in shell.configurables if isinstance(c, DbLLM))
    trait = magics.traits(config=True)[s.name]
    assert magics.setting_values()[s.name] == s.default
    assert s.help in trait.help
    # the flag parses back to the sample, through the same splitter and parser as a real line
    words = settings.to_argv(s.name, SAMPLES[s.name])
    assert words and words[0].split("=", 1)[0] in s.flags
    line = " ".join(shlex.quote(w) for w in words)
    argv, prompt = split_options(line)
    assert prompt == ""
    parsed = getattr(DbLLM.dbllm.parser.parse_args(argv), s.name)
    if s.type is dict:  # one dict per -p
        parsed = {k: v for item in parsed for k, v in item.items()}
    elif s.sweep:  # given several times, a sweep setting compares its values
        parsed = parsed[0]
    assert parsed == SAMPLES[s.name]
    if s.scope == "call":
        assert s.widget is not None, f"{s.name} is a call setting without a panel control"
        assert s.name in Panel(shell).controls
    else:
        assert s.widget is None  # magic-only: what the cell does with the answer


def test_panel_to_cell_to_request_round_trip(shell, workspace):
    shell.run_cell(TRANSFORMS)
    p = Panel(shell)
    values = {"system": SAMPLES["system"], "temperature": "0.25", "max_tokens": "20", "stop": ["\\n\\n", "END"],
              "extra_params": '{"top_p": 0.9, "tags": ["a"], "style": "terse"}', "timeout": "30",
              "transform_input": "concise", "transform_output": "shout", "format": "text", "stream": False,
              "chat": True}
    for name, value in values.items():
        p.controls[name].value = value
    p.prompt.value = "Hi {{ 1 + 1 }}"
    p.send()
    p.wait()
    from_panel = posts(workspace)[-1].json
    assert from_panel == {"messages": [{"role": "system", "content": "Line one\nline two"},
                                       {"role": "user", "content": "Hi 2 Be concise."}],
                          "temperature": 0.25, "max_tokens": 20, "stop": ["\n\n", "END"], "top_p": 0.9,
                          "tags": ["a"], "style": "terse"}
    cell = p.as_cell()
    assert "--no-config" not in cell  # nothing set by %config
    _history.of(p.client).reset()  # the cell's turn must start the conversation as the panel's did
    assert shell.run_cell(cell).success
    assert posts(workspace)[-1].json == from_panel
    assert shell.user_ns["_dbllm"].text == "[LINE ONE\nLINE TWO] ECHO: HI 2 BE CONCISE."


def test_round_trip_for_a_proxy_app_and_a_task(shell, workspace):
    p = Panel(shell)
    p.endpoint.value = PROXY
    p.cluster_id.value, p.port.value, p.org_id.value = CLUSTER, str(PORT), "42"
    p.prompt.value = "How are you?"
    p.send()
    p.wait()
    sent = posts(workspace)[-1]
    assert sent.path == f"/driver-proxy-api/o/42/{CLUSTER}/{PORT}"
    assert shell.run_cell(p.as_cell()).success
    assert (posts(workspace)[-1].path, posts(workspace)[-1].json) == (sent.path, sent.json)
    p.endpoint.value, p.controls["task"].value = CUSTOM, "completions"
    assert "--task=completions" in p.as_cell()


def test_an_empty_panel_field_means_none_and_copy_as_cell_writes_what_the_panel_sends(shell, workspace):
    """On main a cleared system prompt or temperature still sent the %config default, a value that
    starts with a dash made a cell that did not parse, and a %config set after the panel opened
    changed the copied cell but not the panel."""
    shell.run_line_magic("config", 'DbLLM.system = "Be terse."')
    shell.run_line_magic("config", "DbLLM.temperature = 0.7")
    p = Panel(shell)
    assert p.system.value == "Be terse." and p.temperature.value == "0.7"
    p.system.value, p.temperature.value = "", ""
    p.stop_sequences.value = ["--", "-x"]
    p.controls["max_tokens"].value = "5"
    p.prompt.value = "one -- two"
    p.send()
    p.wait()
    from_panel = posts(workspace)[-1].json
    assert from_panel["messages"] == [{"role": "user", "content": "one -- two"}] and "temperature" not in from_panel
    shell.run_line_magic("config", "DbLLM.max_tokens = 99")  # after the panel opened
    cell = p.as_cell()
    assert "'--stop=--' --stop=-x" in cell or "--stop=-- --stop=-x" in cell
    assert shell.run_cell(cell).success
    assert posts(workspace)[-1].json == from_panel


def test_deeply_nested_json_in_the_extra_fields_box_is_an_error_on_the_status_line(shell, workspace):
    p = Panel(shell)
    p.controls["extra_params"].value = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    p.prompt.value = "x"
    p.send()  # on main a RecursionError escaped Send, and the button silently did nothing
    assert "nested too deeply" in p.status.value and posts(workspace) == []


def test_a_cleared_panel_field_beats_config_in_the_copied_cell(shell, workspace):
    # drift: the panel compared with %config and left a cleared stop list out of the cell
    shell.run_line_magic("config", 'DbLLM.stop = ["END"]')
    shell.run_line_magic("config", "DbLLM.temperature = 0.7")
    p = Panel(shell)
    assert p.stop_sequences.value == ["END"] and p.temperature.value == "0.7"
    p.stop_sequences.value = []
    p.prompt.value = "one END two"
    p.send()
    p.wait()
    from_panel = posts(workspace)[-1].json
    assert "stop" not in from_panel and from_panel["temperature"] == 0.7
    cell = p.as_cell()
    assert cell.startswith("%%dbllm --no-config --endpoint=") and "--stop" not in cell and "--temperature=0.7" in cell
    assert shell.run_cell(cell).success
    assert posts(workspace)[-1].json == from_panel


def test_config_refuses_what_the_flag_refuses_with_the_same_words(shell, workspace):
    # drift: %config DbLLM.max_tokens = 0 was accepted while --max-tokens 0 was refused
    magics = next(c for c in shell.configurables if isinstance(c, DbLLM))
    cases = [("max_tokens", "0", 0), ("temperature", "nan", float("nan")), ("timeout", "-1", -1.0),
             ("port", "70000", 70000), ("format", "yaml", "yaml"), ("output", "class", "class"),
             ("task", "chta", "chta"), ("endpoint", "../x", "../x")]
    for name, typed, value in cases:
        with pytest.raises(ConfigurationError) as flag:
            settings.from_text(name, typed)
        with pytest.raises(TraitError) as config:
            setattr(magics, name, value)
        words = str(flag.value).rsplit("; got ", 1)[0]
        assert str(config.value).startswith(words + "; got "), (name, str(config.value))
        p = Panel(shell)
        if name in p.controls and settings.BY_NAME[name].widget in ("text", "number"):
            p.controls[name].value = typed
            p.prompt.value = "hi"
            p.send()
            assert words in html.unescape(p.status.value)
    assert magics.max_tokens is None and posts(workspace) == []
    shell.run_line_magic("config", "DbLLM.max_tokens = 0")  # IPython logs the refusal; the value stays
    assert magics.max_tokens is None


def test_panel_starts_from_config_chat(shell):
    # drift: the panel kept the conversation whatever DbLLM.chat said
    assert Panel(shell).chat.value is False
    shell.run_line_magic("config", "DbLLM.chat = True")
    assert Panel(shell).chat.value is True


def test_panel_without_the_extension_uses_the_built_in_defaults(shell):
    shell.run_line_magic("unload_ext", "dbmagic")
    try:
        p = Panel(shell)
        assert p.format.value == "markdown" and p.stream.value is True and p.stop_sequences.value == []
    finally:
        shell.run_line_magic("load_ext", "dbmagic")


def test_no_config_ignores_the_defaults_for_one_cell(shell, workspace):
    shell.run_line_magic("config", f'DbLLM.endpoint = "{CHAT}"')
    shell.run_line_magic("config", "DbLLM.temperature = 0.7")
    shell.run_cell_magic("dbllm", "", "with")
    assert posts(workspace)[-1].json["temperature"] == 0.7
    shell.run_cell_magic("dbllm", f"--no-config -e {CHAT}", "without")
    assert "temperature" not in posts(workspace)[-1].json


def test_each_module_imports_alone():
    # every module of the package, the grouped ones (dbmagic.call.wire, dbmagic.testing._handler) too
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in sorted((ROOT / "dbmagic").rglob("*.py")) if p.name != "__main__.py"]
    runs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stderr=subprocess.PIPE, text=True)
            for m in modules}
    failed = {m: run.communicate(timeout=60)[1].strip().splitlines()[-1:] for m, run in runs.items()}
    assert {m: err for m, err in failed.items() if runs[m].returncode} == {}
    # the panel is an adapter over the client, not over the magic (on main a source check looked for
    # "dbmagic.frontends.magic" where the code imports relatively, so it could not fail)
    loaded = subprocess.run([sys.executable, "-c", "import sys, dbmagic.frontends.panel; print('dbmagic.frontends.magic' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_the_core_tests_need_no_nbval():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:nbval", "-p", "no:cacheprovider",
                             "tests/test_wire.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_a_refused_config_value_stops_the_next_cell(shell, workspace):
    """IPython only logs a %config it refuses, and the cell passes; on main the next %%dbllm then
    sent the old value as if nothing had happened."""
    shell.run_line_magic("config", f'DbLLM.endpoint = "{CHAT}"')
    shell.run_line_magic("config", "DbLLM.max_tokens = 50")
    shell.run_line_magic("config", "DbLLM.max_tokens = 0")  # refused: at least 1
    with pytest.raises(UsageError, match=r"%config DbLLM.max_tokens was refused \(max_tokens must be at least 1"):
        shell.run_cell_magic("dbllm", "", "x")
    assert posts(workspace) == []
    shell.run_cell_magic("dbllm", "--no-config -e " + CHAT, "x")  # without the defaults it runs
    shell.run_line_magic("config", "DbLLM.max_tokens = 20")
    shell.run_cell_magic("dbllm", "", "y")
    assert posts(workspace)[-1].json["max_tokens"] == 20
