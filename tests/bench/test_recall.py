import pytest
import torch

from gam.bench import main
from gam.bench.common import model_available
from gam.bench.recall import IGNORE_INDEX, make_mqar_batch, query_distances


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_targets_only_at_queries_and_equal_to_paired_value(random_non_queries):
    b, t, p, v = 16, 64, 8, 64
    x, y = make_mqar_batch(b, t, p, v, seed=3, random_non_queries=random_non_queries)
    assert x.shape == y.shape == (b, t) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < v
    for row in range(b):
        keys, values = x[row, 0:2 * p:2], x[row, 1:2 * p:2]
        assert len(set(keys.tolist())) == p and len(set(values.tolist())) == p
        assert all(1 <= k < v // 2 for k in keys.tolist())
        assert all(v // 2 <= val < v for val in values.tolist())
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        query_pos = (y[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(query_pos) == p
        assert all(q >= 2 * p and (q - 2 * p) % 2 == 0 for q in query_pos)
        queried = [x[row, q].item() for q in query_pos]
        assert sorted(queried) == sorted(keys.tolist())  # every key exactly once
        for q in query_pos:
            assert y[row, q].item() == pairs[x[row, q].item()]
        assert (y[row, : 2 * p] == IGNORE_INDEX).all()


def test_mqar_is_deterministic_and_validates():
    a = make_mqar_batch(4, 32, 4, 32, seed=7)
    b = make_mqar_batch(4, 32, 4, 32, seed=7)
    c = make_mqar_batch(4, 32, 4, 32, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError):
        make_mqar_batch(2, 15, 4, 64)  # needs seq_len >= 4 * pairs
    with pytest.raises(ValueError):
        make_mqar_batch(2, 64, 8, 16)  # only 7 keys in a vocab of 16
    x, y = make_mqar_batch(2, 64, 4, 64, seed=0, power_a=0.01)
    assert int((y != IGNORE_INDEX).sum()) == 8


def test_query_distances():
    x, y = make_mqar_batch(8, 64, 8, 64, seed=1)
    d = query_distances(x, y, 8)
    rows, pos = torch.nonzero(y != IGNORE_INDEX, as_tuple=True)
    for dist, r, q in zip(d.tolist(), rows.tolist(), pos.tolist(), strict=True):
        assert x[r, q - dist].item() == x[r, q].item()  # the key in the context
        assert x[r, q - dist + 1].item() == y[r, q].item()  # followed by its value
        assert dist >= 2


def test_recall_smoke(out_dir, check):
    models = ["gam", "transformer"] + ([] if model_available("mamba") else ["mamba"])
    code = main(["recall", "--models", *models, "--seq-lens", "16", "32",
                 "--num-kv-pairs", "2", "4", "--d-model", "16", "--n-layers", "1",
                 "--vocab-size", "32", "--steps", "3", "--tokens-per-step", "128",
                 "--eval-examples", "8", "--threads", "1", "--device", "cpu",
                 "--out", str(out_dir)])
    assert code == 0
    results = check.load_results(out_dir)
    check.assert_environment(results)
    runs = results["runs"]
    # T 16: pairs 2 and 4; T 32: pairs 2 and 4
    assert len(runs) == len(models) * 4
    for r in runs:
        assert r["status"] == "ok", r
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["receptive_field"] >= 1 and 0.0 <= r["reachable_fraction"] <= 1.0
    gam_rf = {r["receptive_field"] for r in runs if r["model"] == "gam"}
    assert gam_rf == {1 + 1 * (3 - 1)}  # 1 layer, kernel 3
    check.assert_png(out_dir / "recall.png")
    assert "Receptive field" in (out_dir / "results.md").read_text()


def test_recall_per_length_trains_one_model_per_length(out_dir, check):
    code = main(["recall", "--models", "gam", "--seq-lens", "16", "32", "--num-kv-pairs", "2",
                 "--d-model", "16", "--n-layers", "1", "--vocab-size", "32", "--steps", "2",
                 "--tokens-per-step", "64", "--eval-examples", "4", "--per-length",
                 "--threads", "1", "--device", "cpu", "--out", str(out_dir)])
    assert code == 0
    results = check.load_results(out_dir)
    assert [t["seq_lens"] for t in results["training"]] == [[16], [32]]
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in results["runs"]] == [(16, 2), (32, 2)]
