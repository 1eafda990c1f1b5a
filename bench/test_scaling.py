"""Time and extra memory against N (tokens) and V (vocabulary): the fused paths' extra memory stays flat in
N while the naive path grows linearly. Plots: ``scaling_n.png``, ``scaling_v.png`` in the results directory.
"""


def test_scaling_n(bench_case, scaling_n_case, contender_name):
    entry = bench_case("scaling_n", contender_name, scaling_n_case)
    assert entry["status"] == "ok"


def test_scaling_v(bench_case, scaling_v_case, contender_name):
    entry = bench_case("scaling_v", contender_name, scaling_v_case)
    assert entry["status"] == "ok"
