import pytest

from capa_export import CapaConfig, CapaError


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune=[(2, 0)]), r"prune\[0\] keep k=0 must be >= 1"),
    (dict(prune=[(0, 64)]), r"layer K=0 must be >= 1"),
    (dict(prune=[(2, 64), (2, 32)]), "strictly increasing layers"),
    (dict(prune=[(2, 64), (4, 64)]), "must be fewer"),
    (dict(prune=[(2,)]), "pair of integers"),
    (dict(variant="fastv"), "variant 'fastv' is unknown"),
    (dict(queries="all"), "queries 'all' is unknown"),
    (dict(ffn_layers="some"), "ffn_layers"),
    (dict(ffn_layers=[3, 3]), "distinct"),
    (dict(ffn_threshold=2.0), "ffn_threshold"),
    (dict(ffn_range=(5, 2)), "ffn_range"),
    (dict(ffn_rank=0), "ffn_rank"),
])
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(CapaError, match=message):
        CapaConfig(**kwargs)


def test_json_round_trip(tmp_path):
    config = CapaConfig(prune=[(2, 192), (6, 64)], variant="value_norm", queries="last", ffn_layers=[3, 4],
                        ffn_range=(2, 10), ffn_rank=16)
    config.save(tmp_path)
    assert CapaConfig.load(tmp_path) == config


def test_model_dependent_limits():
    with pytest.raises(CapaError, match=r"must be in \[1, 7\]"):
        CapaConfig(prune=[(8, 64)]).check_for_model(8)
    with pytest.raises(CapaError, match=r"k must be in \[1, 576\]"):
        CapaConfig(prune=[(2, 600)]).check_for_visual_tokens(576)


def test_unknown_field_in_json(tmp_path):
    (tmp_path / "capa_config.json").write_text('{"prune": [], "keep": 3}')
    with pytest.raises(CapaError, match="key keep is unknown"):
        CapaConfig.load(tmp_path)
