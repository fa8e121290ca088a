"""The node helpers the passes share (passes/graph_util.py), on a graph Dynamo captured: where two
helpers answer the same question with a different edge (target_name / call_name, dim_order /
constant_permutation), the edge each caller relies on is pinned here."""
import operator

import pytest
import torch

from compact_compile.passes.graph_util import (argument, call_name, constant_permutation, dim_order, example_value,
                                               getitems, replace_node, static_shape, target_name)


def captured(fn, *args, dynamic=False) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def layout_ops(x):
    return x.transpose(1, 2), x.permute(0, 2, 1, 3), torch.split(x, 1, dim=1), torch.cat([x, x], dim=2)


@pytest.fixture
def graph():
    return captured(layout_ops, torch.randn(2, 3, 4, 5))


def nodes(gm, name):
    return [n for n in gm.graph.nodes if call_name(n) == name]


def test_example_value_and_static_shape(graph):
    (x,) = [n for n in graph.graph.nodes if n.op == "placeholder"]
    assert static_shape(x) == (2, 3, 4, 5) and example_value(x).shape == (2, 3, 4, 5)
    assert example_value(3) is None and static_shape(None) is None
    (split,) = nodes(graph, "split")
    assert isinstance(example_value(split), tuple) and static_shape(split) is None   # no tensor: no shape


def test_a_symbolic_dim_has_no_static_shape():
    gm = captured(lambda x: x * 2, torch.randn(2, 3), dynamic=True)
    x = next(n for n in gm.graph.nodes if isinstance(example_value(n), torch.Tensor))
    assert static_shape(x) is None


def test_target_name_names_any_node_call_name_only_calls(graph):
    placeholder = next(n for n in graph.graph.nodes if n.op == "placeholder")
    assert target_name(placeholder) == placeholder.target and call_name(placeholder) == ""
    (output,) = [n for n in graph.graph.nodes if n.op == "output"]
    assert target_name(output) == "output" and call_name(output) == ""
    assert {call_name(n) for n in graph.graph.nodes} >= {"transpose", "permute", "split", "cat"}


def test_both_permutation_readers_agree_on_constants(graph):
    for node in nodes(graph, "transpose") + nodes(graph, "permute"):
        assert dim_order(node, 4) == constant_permutation(node, 4) == [0, 2, 1, 3]


def test_constant_permutation_is_none_for_an_argument_it_cannot_read():
    g = torch.fx.Graph()
    x, d = g.placeholder("x"), g.placeholder("d")
    node = g.call_method("transpose", (x, d, 1))
    assert constant_permutation(node, 4) is None


def test_argument_by_keyword_or_position(graph):
    (cat,) = nodes(graph, "cat")
    assert argument(cat, 1, "dim", 0) == 2 and len(argument(cat, 0, "tensors")) == 2
    g = torch.fx.Graph()
    bare = g.call_function(torch.cat, (g.placeholder("xs"),))
    assert argument(bare, 1, "dim", 0) == 0 and argument(bare, 1, "dim") is None


def test_getitems_and_replace_node(graph):
    g = graph.graph
    (split,) = nodes(graph, "split")
    (cat,) = nodes(graph, "cat")
    with g.inserting_after(split):
        parts = getitems(split, 3)
    assert [(p.target, p.args) for p in parts] == [(operator.getitem, (split, i)) for i in range(3)]
    x = next(n for n in g.nodes if n.op == "placeholder")
    users = list(cat.users)
    with g.inserting_after(cat):
        new = g.call_function(torch.neg, (x,))
    replace_node(cat, new)
    assert cat not in g.nodes and new.meta["example_value"].shape == (2, 3, 8, 5)    # cat's, taken over
    assert users and all(new in u.all_input_nodes for u in users)
