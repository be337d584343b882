"""The planted case, for every estimator: informative units, an exact and a linear copy of two of them, pure-noise
units and a constant unit. Given the other units, copies and useless units must test insignificant and informative
ones significant; a MIPP sweep (MI ordering, remove at once) must keep exactly one unit of each informative kind."""
import pytest
import torch

from mipp.mi import get_estimator

NAMES = ["a1", "a2", "a3", "copy of a1", "2 a2 + 1", "noise 1", "noise 2", "constant"]
INFORMATIVE, REDUNDANT, USELESS = (0, 1, 2), (3, 4), (5, 6, 7)
TWIN = {0: 3, 1: 4, 3: 0, 4: 1}

# estimator -> (options, samples); sizes keep each estimator's share of the suite to a few seconds
SETTINGS = {
    "gaussian": ({}, 2000),
    "ksg": ({"n_permutations": 39}, 600),
    "proxy": ({"repeats": 4, "batch_size": 256}, 1200),
}


def planted(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.stack([a[:, 0] + 0.6 * a[:, 1], a[:, 2] - 0.6 * a[:, 1]], 1)
    y = torch.tanh(y) + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    units = torch.stack(
        [a[:, 0], a[:, 1], a[:, 2], a[:, 0].clone(), 2 * a[:, 1] + 1, noise[:, 0], noise[:, 1],
         torch.full((n,), 3.0, dtype=torch.float64)],
        dim=1,
    )
    return units, y


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_planted_units_are_classified(name):
    options, n = SETTINGS[name]
    units, y = planted(n)
    est = get_estimator(name, **options)
    for i in range(8):
        others = [j for j in range(8) if j != i]
        if i in INFORMATIVE and i in TWIN:  # an informative unit is only informative once its copy is gone
            others.remove(TWIN[i])
        result = est.test(units[:, i], y, units[:, others], confidence=0.95)
        assert result.significant == (i in INFORMATIVE), (name, NAMES[i], result)
    for i in REDUNDANT:  # and a copy is redundant given its twin
        others = [j for j in range(8) if j != i]
        assert not est.test(units[:, i], y, units[:, others]).significant, (name, NAMES[i])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_sweep_keeps_one_unit_per_informative_source(name):
    options, n = SETTINGS[name]
    units, y = planted(n)
    session = get_estimator(name, **options).session(units, y, confidence=0.95)
    order = torch.argsort(session.unit_mi()).tolist()
    assert set(order[:3]) == set(USELESS)  # the MI ordering tests useless units first
    for i in order:
        if len(session.kept) == 1:
            break
        if not session.transfer_entropy(i).significant:
            session.remove(i)
    kept = set(session.kept)
    assert len(kept) == 3 and not kept & set(USELESS)
    assert 2 in kept and len(kept & {0, 3}) == 1 and len(kept & {1, 4}) == 1
