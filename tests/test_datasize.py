"The learning-curve lesson's helpers (03c_datasize): nested training sets and steps for a number of epochs."
import pytest
from finetune_lab.datasize import nested_subsets, steps_for_epochs

def test_nested_subsets_are_nested_seeded_and_distinct():
    rows = [{"i": i} for i in range(50)]
    sets = nested_subsets(rows, [20, 5, 10], seed=1)
    assert list(sets) == [5, 10, 20] and [len(v) for v in sets.values()] == [5, 10, 20]
    assert sets[10][:5] == sets[5] and sets[20][:10] == sets[10]               # each smaller set inside each larger one
    assert len({r["i"] for r in sets[20]}) == 20                               # no row twice
    assert nested_subsets(rows, [20], seed=1)[20] == sets[20]                  # seeded
    assert nested_subsets(rows, [20], seed=2)[20] != sets[20]
    assert nested_subsets(rows, [50])[50] != rows and sorted(r["i"] for r in nested_subsets(rows, [50])[50]) == list(range(50))
    with pytest.raises(ValueError, match="only 50 rows"): nested_subsets(rows, [51])

@pytest.mark.parametrize("rows,epochs,batch,steps", [(1643, 140 * 4 / 1643, 4, 140), (100, 0.34, 4, 8), (1000, 1, 4, 250), (3, 0.01, 4, 1), (10, 2, 3, 7)])
def test_steps_for_epochs(rows, epochs, batch, steps):
    assert steps_for_epochs(rows, epochs, batch) == steps
