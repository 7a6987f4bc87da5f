"""Methods from other packages: the `dwakd.methods` entry-point group registers them beside the built-in ones."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import EntryPoint

import pytest

PLUGIN = '''
"""A method another package ships: CE scaled by a factor (enough to see it is the one that trained)."""
from dataclasses import dataclass

from dwakd.methods import DistillationMethod, LossOutput, MethodOptions, register_method, register_preset
from dwakd.modules.cross_entropy import student_cross_entropy_sum


@dataclass
class ScaledCEOptions(MethodOptions):
    scale: float = 1.0


@register_method
class ScaledCE(DistillationMethod):
    name = "plugin-scaled-ce"
    title = "Scaled CE"
    Options = ScaledCEOptions
    needs_teacher = False

    def compute_loss(self, inputs):
        ce = student_cross_entropy_sum(inputs.student_out, inputs.student, "dense") / inputs.num_items
        return LossOutput(self.options.scale * ce, {"ce": ce.detach()})


register_preset("plugin-scaled-ce-x3", ScaledCE, title="Scaled CE ×3", scale=3.0)
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """The plugin's module on sys.path; its registrations are removed afterwards."""
    from dwakd.methods import registry

    (tmp_path / "dwakd_test_plugin.py").write_text(PLUGIN)
    (tmp_path / "dwakd_test_clash.py").write_text(PLUGIN.replace('name = "plugin-scaled-ce"', 'name = "dskd"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "dwakd_test_plugin"
    for name in ("plugin-scaled-ce", "plugin-scaled-ce-x3"):
        registry._REGISTRY.pop(name, None)
        registry._TITLES.pop(name, None)
    for module in ("dwakd_test_plugin", "dwakd_test_clash"):
        sys.modules.pop(module, None)


def test_an_entry_point_registers_its_methods_and_presets(plugin_module, tiny_yaml, tmp_path, capsys):
    from dwakd.cli import main
    from dwakd.methods import ENTRY_POINT_GROUP, build_options, load_plugin_methods, method_names, method_title

    point = EntryPoint(name="scaled-ce", value=plugin_module, group=ENTRY_POINT_GROUP)
    assert load_plugin_methods([point]) == ["scaled-ce"]
    assert {"plugin-scaled-ce", "plugin-scaled-ce-x3"} <= set(method_names())
    assert method_title("plugin-scaled-ce-x3") == "Scaled CE ×3" and build_options("plugin-scaled-ce-x3").scale == 3.0

    out = tmp_path / "plugin-run"
    assert main(["train", str(tiny_yaml), f"output_dir={out}", "method=plugin-scaled-ce-x3",
                 "training.max_steps=1", "--no-progress"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out and (out / "model.safetensors").is_file()


def test_a_broken_plugin_is_skipped_with_a_warning_naming_it(plugin_module, caplog):
    from dwakd.methods import ENTRY_POINT_GROUP, get_method, load_plugin_methods

    broken = EntryPoint(name="broken", value="dwakd_no_such_plugin_module", group=ENTRY_POINT_GROUP)
    clash = EntryPoint(name="clash", value="dwakd_test_clash", group=ENTRY_POINT_GROUP)  # registers "dskd" again
    good = EntryPoint(name="scaled-ce", value=plugin_module, group=ENTRY_POINT_GROUP)
    with caplog.at_level(logging.WARNING, logger="dwakd.methods"):
        assert load_plugin_methods([broken, clash, good]) == ["scaled-ce"]
    assert "'broken'" in caplog.text and "dwakd_no_such_plugin_module" in caplog.text
    assert "'clash'" in caplog.text and "already registered by DSKD" in caplog.text
    assert get_method("plugin-scaled-ce")[0].__name__ == "ScaledCE"  # the good one is there
    assert get_method("dskd")[0].__module__ == "dwakd.methods.dskd"  # and the built-in is not replaced
