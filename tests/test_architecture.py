"""The house: no import cycles at all (imports inside functions included)."""
import grimp


def _cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            strong(m)
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("diffsolve")
    assert len(graph.modules) > 40
    assert _cycles(graph) == []


def test_layers_are_folders():
    graph = grimp.build_graph("diffsolve")
    for high, low in [("diffsolve.sampling", "diffsolve.solvers"), ("diffsolve.solvers", "diffsolve.adapters"),
                      ("diffsolve.tuning", "diffsolve.sampling"), ("diffsolve.hub", "diffsolve.integrations")]:
        assert graph.find_illegal_dependencies_for_layers(layers=(high, low)) == set()
