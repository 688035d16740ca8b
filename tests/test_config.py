"""The configuration (config.py): defaults <- preset <- flags."""
from config import parse_config


def test_parse_config_preset_then_flags():
    cfg = parse_config(["--dataset", "toy", "--epochs", "3", "--d-model", "32"])
    assert cfg.train.epochs == 3 and cfg.model.d_model == 32
    assert cfg.tok.codebook_size == 16  # from the toy preset
    assert parse_config(["--dataset", "beauty"]).tok.codebook_size == 256


def test_method_presets_apply_to_their_method_alone():
    """Beauty's GFlowGR-TB has its own context, pool and learning rate (config.METHOD_PRESETS); the
    other methods keep the data set's preset, and a flag wins over both, also across --method all."""
    from config import run_dir, with_method

    tb = parse_config(["--dataset", "beauty"])
    assert (tb.train.method, tb.ft.gfn_context, tb.sampler.n_candidates, tb.sampler.K) == ("gflowgr-tb", "next", 50, 50)
    assert (tb.ft.target_weight, tb.ft.weight, tb.ft.lam, tb.ft.ft_lr, tb.ft.refit_test) == (True, False, 1.0, 1e-3, True)
    # the refit continues the validation model 2 epochs; from SFT it is "refit-cold", and no refit has no warm refit
    assert tb.ft.refit_epochs == 2 and run_dir(tb).name == "beauty__gflowgr-tb__seed42"
    assert run_dir(parse_config(["--dataset", "beauty", "--refit-epochs", "0"])).name == "beauty__gflowgr-tb+refit-cold__seed42"
    assert parse_config(["--dataset", "beauty", "--no-refit-test"]).ft.refit_epochs == 0
    # the preset's test refit goes where the next context goes: --gfn-context same has none, and no "refit-off" name
    same = parse_config(["--dataset", "beauty", "--gfn-context", "same"])
    assert not same.ft.refit_test and run_dir(same).name == "beauty__gflowgr-tb+ctx-same__seed42"
    assert run_dir(parse_config(["--dataset", "beauty", "--no-refit-test"])).name == "beauty__gflowgr-tb+refit-off__seed42"
    assert not with_method(parse_config(["--dataset", "beauty", "--method", "all", "--ft-last", "2"]), "gflowgr-tb").ft.refit_test
    for method in ("sft-continued", "sdpo", "gflowgr-db"):
        c = parse_config(["--dataset", "beauty", "--method", method])
        assert (c.ft.gfn_context, c.sampler.K, c.ft.target_weight, c.ft.weight, c.ft.lam, c.ft.ft_lr, c.ft.refit_test) == \
            ("same", 10, False, True, 0.03, 3e-4, False)
        assert with_method(tb, method) == c  # switching the method is parsing with that method
        assert with_method(c, "gflowgr-tb") == tb
    assert parse_config(["--dataset", "toy"]).ft.gfn_context == "same"  # toy and Yelp: no method preset
    # a flag stays through the switch, for every method (here: --method all's runs)
    every = parse_config(["--dataset", "beauty", "--method", "all", "--ft-lr", "2e-3", "--K", "5"])
    assert (with_method(every, "gflowgr-tb").ft.ft_lr, with_method(every, "gflowgr-tb").sampler.K) == (2e-3, 5)
    assert with_method(every, "gflowgr-tb").sampler.n_candidates == 50  # not given: GFlowGR-TB's own
    assert (with_method(every, "dpo").ft.ft_lr, with_method(every, "dpo").sampler.n_candidates) == (2e-3, 10)


def test_runs_written_before_the_prefix_tree_read_as_flat_and_are_named_so():
    """--prefix-tree is the default now; a run whose config.json predates the field decoded every
    trajectory apart, so it reads back as --no-prefix-tree and its folder name says "flat"."""
    from dataclasses import asdict

    from config import config_from_dict, run_dir

    cfg = parse_config(["--dataset", "beauty"])
    assert cfg.ft.prefix_tree and run_dir(cfg).name == "beauty__gflowgr-tb__seed42"
    old = asdict(cfg)
    del old["ft"]["prefix_tree"]
    back = config_from_dict(old)
    assert not back.ft.prefix_tree and run_dir(back).name == "beauty__gflowgr-tb+flat__seed42"
    assert run_dir(parse_config(["--dataset", "beauty", "--method", "sft-continued", "--no-prefix-tree"])).name == \
        "beauty__sft-continued__seed42"  # a setting SFT-continued never reads is not in its name
