"""contribution_scores against a brute-force float64 computation (CAPA eq. 2 and variants)."""

import pytest
import torch

import capa_export.method.scoring as scoring
from capa_export import contribution_scores
from capa_export.method.scoring import top_k_indices

from .conftest import brute_force_scores

CASES = [  # B, H, H_kv, Q, N, d, D
    (1, 4, 4, 1, 9, 8, 32),
    (2, 4, 2, 3, 13, 8, 16),  # GQA
    (1, 8, 1, 5, 6, 4, 24),  # multi-query
]


@pytest.mark.parametrize("variant", ["contrib", "value_norm", "attention"])
@pytest.mark.parametrize("shape", CASES)
def test_matches_brute_force_float64(shape, variant):
    b, h, h_kv, q, n, d, big_d = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    probs = torch.rand(b, h, q, n, generator=gen, dtype=torch.float64)
    values = torch.randn(b, h_kv, n, d, generator=gen, dtype=torch.float64)
    o_weight = torch.randn(big_d, h * d, generator=gen, dtype=torch.float64)
    got = contribution_scores(probs, values, o_weight, variant=variant)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, brute_force_scores(probs, values, o_weight, variant), rtol=1e-10, atol=1e-12)
    got32 = contribution_scores(probs.float(), values.float(), o_weight.float(), variant=variant)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), brute_force_scores(probs, values, o_weight, variant), rtol=1e-5, atol=1e-6)


def test_chunked_contrib_equals_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    probs, values, o_weight = torch.rand(1, 4, 2, 37, generator=gen), torch.randn(1, 2, 37, 8, generator=gen), torch.randn(16, 32, generator=gen)
    whole = contribution_scores(probs, values, o_weight)
    monkeypatch.setattr(scoring, "_CONTRIB_CHUNK_ELEMENTS", 4 * 16 * 5)  # 5 keys per chunk
    torch.testing.assert_close(contribution_scores(probs, values, o_weight), whole)


def test_contribution_is_not_attention():
    """A key with much attention but a tiny value must rank below one with less attention and a
    large value: the point of CAPA."""
    probs = torch.tensor([[[[0.6, 0.1]]]])
    values = torch.tensor([[[[0.01, 0.0], [1.0, 0.0]]]])
    o_weight = torch.eye(2)
    assert contribution_scores(probs, values, o_weight, variant="attention").argmax() == 0
    assert contribution_scores(probs, values, o_weight, variant="contrib").argmax() == 1


def test_top_k_ties_prefer_lower_index_and_sorted():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert top_k_indices(scores, 2).tolist() == [[1, 2]]
    assert top_k_indices(scores, 4).tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(probs=torch.rand(2, 4, 3)), "probs must be"),
    (dict(values=torch.rand(1, 3, 5, 4)), "multiple of values heads"),
    (dict(values=torch.rand(1, 2, 6, 4)), "keys"),
    (dict(values=torch.rand(2, 2, 5, 4)), "batch"),
    (dict(o_weight=torch.rand(8, 12)), "H\\*d"),
    (dict(o_weight=torch.rand(8, 16).double()), "one dtype"),
    (dict(variant="magic"), "variant"),
])
def test_bad_inputs_name_the_argument(kwargs, message):
    args = dict(probs=torch.rand(1, 4, 3, 5), values=torch.rand(1, 2, 5, 4), o_weight=torch.rand(8, 16), variant="contrib")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        contribution_scores(args["probs"], args["values"], args["o_weight"], variant=args["variant"])


@pytest.mark.parametrize("variant", ["contrib", "value_norm", "attention"])
@pytest.mark.parametrize("shape", CASES)
def test_dense_form_for_onnx_matches_brute_force(shape, variant):
    from capa_export.method.scoring import contribution_scores_dense

    b, h, h_kv, q, n, d, big_d = shape
    gen = torch.Generator().manual_seed(11)
    probs = torch.rand(b, h, q, n, generator=gen)
    values = torch.randn(b, h_kv, n, d, generator=gen)
    o_weight = torch.randn(big_d, h * d, generator=gen)
    got = contribution_scores_dense(probs, values, o_weight, variant)
    torch.testing.assert_close(got.double(), brute_force_scores(probs, values, o_weight, variant), rtol=1e-5, atol=1e-5)
