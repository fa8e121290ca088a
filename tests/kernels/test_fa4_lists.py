"""The CPU half of FA4's key-padding masks (kernels/fa4.py): per call, each query block's list of key
blocks is split into FA4's "mask" list (blocks holding a key that key_valid excludes, where FA4 calls
our mask_mod) and its "full" list (blocks keeping every key); a block keeping no key is in neither.
FA4 walks each list backwards and applies the sequence-length mask only to the first block of each it
processes, so both lists must keep the ascending order of ours: a partial last key block is then the
last entry of whichever list holds it.
The GPU half (FA4 itself) is test_fa4.py."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.kernels.fa4 import key_block_states, split_lists, split_lists_triton
from compact_compile.kernels.registry import batched, kv_block_lists, masked_key_blocks


@st.composite
def split_cases(draw):
    """(lists, key_valid, block size, B): a random block map with its leading dims 1 or not, lists
    from `kv_block_lists` (entries past each count garbage, as other producers may leave them), a
    sequence length that leaves a partial last block or not, and a key mask per batch element or
    one for the batch, with masked keys anywhere."""
    bs = draw(st.sampled_from([4, 16, 128]))
    B, H, nb = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    S = draw(st.integers((nb - 1) * bs + 1, nb * bs))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), nb, nb)
    blocks = torch.rand(shape, generator=g) < draw(st.floats(0.0, 1.0))
    num, idx = kv_block_lists(blocks)
    past = torch.arange(nb) >= num[..., None]
    idx = torch.where(past, torch.randint(-7, 1000, idx.shape, generator=g, dtype=torch.int32), idx)
    key_valid = torch.rand(draw(st.sampled_from([1, B])), S, generator=g) < draw(st.floats(0.0, 1.0))
    return (num, idx), key_valid, bs, B


def brute_states(key_valid, nb, bs):
    """0: block n keeps every key, 1: some, 2: none, one block at a time."""
    S = key_valid.shape[-1]
    keys = [[key_valid[b, n * bs:min(S, (n + 1) * bs)] for n in range(nb)] for b in range(key_valid.shape[0])]
    return torch.tensor([[0 if x.all() else 1 if x.any() else 2 for x in row] for row in keys],
                        dtype=torch.int8).reshape(-1, nb)


@settings(max_examples=200, deadline=None)
@given(split_cases())
def test_split_lists_partitions_each_list_in_order(case):
    """Every listed block that keeps a key appears exactly once across the two lists, in the mask list
    iff it also excludes one (positions past S are no keys), a block keeping none in neither; both
    lists ascending, so a listed partial last block is the last entry of its list; counts and indices
    int32, contiguous, batch B or 1."""
    (num, idx), key_valid, bs, B = case
    nb = idx.shape[-1]
    states = key_block_states(key_valid, nb, bs)
    assert states.shape == (key_valid.shape[0], nb) and torch.equal(states, brute_states(key_valid, nb, bs))
    assert torch.equal(states != 0, masked_key_blocks(key_valid, nb, bs))
    mask_cnt, mask_idx, full_cnt, full_idx = split_lists((num, idx), states)
    Bout = max(num.shape[0], key_valid.shape[0])
    for t in (mask_cnt, mask_idx, full_cnt, full_idx):
        assert t.dtype == torch.int32 and t.is_contiguous() and t.shape[:2] == (Bout, num.shape[1])
    assert mask_idx.shape[2:] == full_idx.shape[2:] == idx.shape[2:]
    num_b, idx_b = batched((num, idx))
    for b in range(Bout):
        state = states[min(b, states.shape[0] - 1)]
        for h in range(num.shape[1]):
            for n in range(nb):
                listed = idx_b[min(b, idx_b.shape[0] - 1), h, n, :num_b[min(b, num_b.shape[0] - 1), h, n]].tolist()
                got_mask = mask_idx[b, h, n, :mask_cnt[b, h, n]].tolist()
                got_full = full_idx[b, h, n, :full_cnt[b, h, n]].tolist()
                assert got_mask == [m for m in listed if state[m] == 1]
                assert got_full == [m for m in listed if state[m] == 0]
                for got in (got_mask, got_full):
                    assert got == sorted(set(got))
                    assert nb - 1 not in got or got[-1] == nb - 1


def test_split_lists_examples():
    """Three batch elements over one shared list: the first masks a key of block 1 (and of nothing
    else); the second only keys past S, which are no keys, so all its blocks stay full; the third
    every real key of the partial last block 2, which leaves the lists."""
    blocks = torch.tensor([[[True, True, False], [False, True, True], [True, True, True]]])
    S = 3 * 4 - 2
    key_valid = torch.ones(3, S, dtype=torch.bool)
    key_valid[0, 5] = False
    key_valid[2, 8:] = False
    states = key_block_states(key_valid, 3, 4)
    assert states.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 2]]
    mask_cnt, mask_idx, full_cnt, full_idx = split_lists(kv_block_lists(blocks), states)
    assert mask_cnt[:, 0].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert full_cnt[:, 0].tolist() == [[1, 1, 2], [2, 2, 3], [2, 1, 2]]
    assert mask_idx[0, 0, :, 0].tolist() == [1, 1, 1]
    assert [full_idx[0, 0, n, :c].tolist() for n, c in enumerate([1, 1, 2])] == [[0], [2], [0, 2]]
    assert [full_idx[1, 0, n, :c].tolist() for n, c in enumerate([2, 2, 3])] == [[0, 1], [1, 2], [0, 1, 2]]
    assert [full_idx[2, 0, n, :c].tolist() for n, c in enumerate([2, 1, 2])] == [[0, 1], [1], [0, 1]]


@settings(max_examples=60, deadline=None)
@given(split_cases())
def test_split_lists_triton_equals_torch(case):
    """The one-launch Triton split FA4 calls on the GPU gives exactly the torch split's tensors
    (here Triton's interpreter; on a GPU machine the compiled kernel)."""
    (num, idx), key_valid, bs, _ = case
    states = key_block_states(key_valid, idx.shape[-1], bs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lists = (num.to(device), idx.to(device))
    want = split_lists(lists, states.to(device))
    got = split_lists_triton(lists, states.to(device))
    for w, g in zip(want, got):
        assert g.dtype == torch.int32 and torch.equal(w, g)
