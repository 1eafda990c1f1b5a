"""Forward(+backward) time and extra memory of every contender on the profile's shapes (SPEC section 5).

One benchmark per (case, contender); ratios to the floor and to the naive path of the same case are
printed at the end of the session and written to ``bench/results/<machine>/results.md``.
"""


def test_loss(bench_case, loss_case, contender_name):
    entry = bench_case("loss", contender_name, loss_case)
    assert entry["status"] == "ok"
