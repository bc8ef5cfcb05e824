"""The scikit-learn front-end through skl2onnx, on real fitted estimators.

Skipped without the ``sklearn`` extra."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("skl2onnx", reason="needs the sklearn extra: pip install 'slimfleet[sklearn]'")
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slimfleet.agent.errors import InputError
from slimfleet.host import convert
from slimfleet.host.cli import cli
from slimfleet.host.plugins import load_plugins

RNG = np.random.default_rng(2)
X = RNG.standard_normal((60, 5)).astype(np.float32)
HOOK = load_plugins().pm.hook


@pytest.fixture
def data(tmp_path):
    np.savez(tmp_path / "x.npz", features=X[:12])
    return tmp_path / "x.npz"


def test_a_classifier_pipeline_gives_labels_and_probabilities(data):
    est = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, X[:, 0] > 0)
    model = convert.convert(est, HOOK, data=data).model
    assert [i.name for i in model.graph.input] == ["features"]
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]


def test_a_regressor_converts(data):
    est = RandomForestRegressor(n_estimators=4, max_depth=4, random_state=0).fit(X, X[:, 1])
    assert convert.convert(est, HOOK, data=data).model.graph.output[0].name == "variable"


def test_a_conversion_that_disagrees_is_refused(data, monkeypatch):
    """skl2onnx's model with a perturbed coefficient: the check must catch it."""
    est = LogisticRegression().fit(X, X[:, 0] > 0)
    import skl2onnx

    original = skl2onnx.to_onnx

    def perturbed(*args, **kwargs):
        model = original(*args, **kwargs)
        (node,) = [n for n in model.graph.node if n.op_type == "LinearClassifier"]
        (coefficients,) = [a for a in node.attribute if a.name == "coefficients"]
        coefficients.floats[0] += 3.0
        return model

    monkeypatch.setattr(skl2onnx, "to_onnx", perturbed)
    with pytest.raises(convert.ConversionError, match="disagrees with the source on output"):
        convert.convert(est, HOOK, data=data)


def test_inputs_that_do_not_fit(tmp_path):
    est = LogisticRegression().fit(X, X[:, 0] > 0)
    np.savez(tmp_path / "two.npz", a=X[:4], b=X[:4])
    with pytest.raises(InputError, match="takes one input"):
        convert.convert(est, HOOK, data=tmp_path / "two.npz")
    np.savez(tmp_path / "narrow.npz", features=X[:4, :3])
    with pytest.raises(InputError, match="example inputs do not fit"):
        convert.convert(est, HOOK, data=tmp_path / "narrow.npz")
    np.savez(tmp_path / "ints.npz", features=X[:4].astype(np.int16))
    with pytest.raises(InputError, match="int16; use float32"):
        convert.convert(est, HOOK, data=tmp_path / "ints.npz")


def test_cli_compresses_an_estimator_named_by_module_attr(tmp_path, monkeypatch, data):
    (tmp_path / "userest.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from sklearn.linear_model import LogisticRegression

            def build():
                x = np.random.default_rng(0).standard_normal((50, 5))
                return LogisticRegression().fit(x, x[:, 0] > 0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    args = [
        "compress",
        "userest:build",
        "--data",
        str(data),
        "-o",
        str(out),
        "--passes",
        "simplify",
        "--quick",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "converted.onnx").is_file() and (out / "model.onnx").is_file()
