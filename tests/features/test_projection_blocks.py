"""Blockwise generation of the per-group projection matrices, against matrices drawn independently here."""
import math

import pytest
import torch

from fixtures.unet import build_featurizer, random_inputs, tiny_model
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, featurize
from gradtrace.features.projection import GroupProjector, name_seed


def _draw(kind, rows, k, seed):
    """The whole (rows, k) matrix from one generator seeded with `seed`, in one call (the former scheme)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn((rows, k), generator=gen) / math.sqrt(k)
    return (torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8) * 2 - 1).float() / math.sqrt(k)


def _reference(kind, seed, name, d, k, block_rows):
    """P assembled from its blocks, each drawn whole from the seed of (seed, name, block)."""
    blocks = []
    for b, r0 in enumerate(range(0, d, block_rows)):
        rows = min(d, r0 + block_rows) - r0
        blocks.append(_draw(kind, rows, k, name_seed(seed, name if b == 0 else f"{name}#block{b}")))
    return torch.cat(blocks)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("d,k", [(1000, 24), (333, 7), (97, 3)])
def test_a_group_of_one_block_keeps_the_former_matrix(kind, d, k):
    proj = GroupProjector.create(kind, ["g"], [d], dims=[k], seed=5)
    proj.step_entries = 16 * k  # drawn in many steps of 16 rows
    assert torch.equal(proj.matrix(0), _draw(kind, d, k, name_seed(5, "g")))
    assert "block_rows" not in proj.info()  # the same settings as a store written before blocks existed


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blockwise_projection_equals_the_dense_projection(kind):
    d, k, block_rows = 1000, 24, 128
    proj = GroupProjector.create(kind, ["small", "g"], [40, d], dims=[8, k], seed=3, block_rows=block_rows)
    proj.cache_entries = 0  # never keep a matrix: project() streams the steps
    dense = _reference(kind, 3, "g", d, k, block_rows)
    assert torch.equal(proj.matrix(1), dense)
    grads = torch.randn(5, d, generator=torch.Generator().manual_seed(0))
    want = grads.double() @ dense.double()
    for step_entries in (16 * k, 50 * k, 10 ** 9):  # the steps' size changes nothing but the rounding
        proj.step_entries = step_entries
        assert torch.equal(proj.matrix(1), dense)
        got = proj.project(1, grads)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert proj.info()["block_rows"] == block_rows  # recorded: the matrix depends on it
    assert not torch.equal(dense[:128], dense[128:256])  # blocks are drawn from different seeds


def test_blockwise_matrices_are_seeded():
    def make(seed, block_rows=64):
        p = GroupProjector.create("rademacher", ["a"], [300], dims=[16], seed=seed, block_rows=block_rows)
        p.cache_entries = 0
        return p

    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(make(7).project(0, x), make(7).project(0, x))
    assert not torch.equal(make(7).matrix(0), make(8).matrix(0))
    assert torch.equal(make(7).matrix(0)[:64], make(7, block_rows=100).matrix(0)[:64])  # block 0: former seed
    assert not torch.equal(make(7).matrix(0)[64:100], make(7, block_rows=100).matrix(0)[64:100])


def test_a_store_drawn_with_other_blocks_is_refused_in_one_line(tmp_path):
    model, sched = tiny_model("unconditional")
    x, ids, _ = random_inputs(model, 4)
    spec = FeatureSpec(projection="rademacher", num_timesteps=1, chunk_rows=4)
    fz, _ = build_featurizer(model, sched, spec)
    featurize(fz, x, ids, tmp_path / "s", spec=spec, model_fingerprint="m", progress=False)  # as stores were before
    fz.projector.block_rows = 4096  # its largest groups now span several blocks: other matrices
    with pytest.raises(UserError, match="'projection' differs") as err:
        featurize(fz, x, ids, tmp_path / "s", spec=spec, model_fingerprint="m", progress=False)
    assert "\n" not in str(err.value)
