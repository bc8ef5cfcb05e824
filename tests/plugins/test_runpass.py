"""runpass: the default slimfleet_apply_pass runs the pass, and yields to other plugins."""

from __future__ import annotations

import models
import pluggy

from slimfleet.host import hookspecs
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import PassResult
from slimfleet.plugins import runpass
from slimfleet.plugins.fp16 import Fp16


def manager(*extra) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(runpass, name="slimfleet.plugins.runpass")
    for plugin in extra:
        pm.register(plugin)
    return pm


def test_applies_the_pass(context):
    result = manager().hook.slimfleet_apply_pass(
        pass_=Fp16(), model=models.mlp(), context=context(), options=Fp16().resolve_options({})
    )
    assert result.changed and result.notes.startswith("float16:")


def test_a_plugin_registered_later_still_goes_first(context):
    class Replacement:
        @hookimpl
        def slimfleet_apply_pass(self, pass_, model, context, options):
            return PassResult(model, False, f"{pass_.name} replaced")

    class Wrapper:
        seen: list[str] = []  # noqa: RUF012

        @hookimpl(wrapper=True)
        def slimfleet_apply_pass(self, pass_, model, context, options):
            result = yield
            self.seen.append(result.notes)
            return result

    wrapper = Wrapper()
    result = manager(Replacement(), wrapper).hook.slimfleet_apply_pass(
        pass_=Fp16(), model=models.mlp(), context=context(), options={}
    )
    assert result.notes == "fp16 replaced"
    assert wrapper.seen == ["fp16 replaced"]
