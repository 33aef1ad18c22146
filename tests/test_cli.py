"""The `study` command: flags are config overrides (one path with --set), and only UserError is one line."""
from __future__ import annotations

import re

import pytest

from study.cli import build_parser, main
from study.config import load_config, to_dict


def parsed(argv):
    return build_parser().parse_args(argv)


def test_bench_flags_set_the_same_config_as_set():
    flags = parsed(["bench", "--variants", "eomt,sfp_m2f", "--sizes", "tiny,S", "--img-size", "320", "--no-fps",
                    "--device", "cuda:1", "--precision", "bf16", "--compile", "--warmup", "0", "--iters", "2",
                    "--scope", "end_to_end", "--no-breakdown", "--compile-mode", "max-autotune", "--min-time", "2.5",
                    "--batch", "32", "--threads", "4", "--modes", "eager,compile+bf16", "--reference", "eomt",
                    "--runtime", "pytorch"])
    sets = parsed(["bench", "--set", "bench.variants=[eomt,sfp_m2f]", "--set", "bench.sizes=[tiny,S]",
                   "--set", "bench.img_size=320", "--set", "bench.fps=false", "--set", "bench.device=cuda:1",
                   "--set", "bench.precision=bf16", "--set", "bench.compile=true", "--set", "bench.warmup=0",
                   "--set", "bench.iters=2", "--set", "bench.scope=end_to_end", "--set", "bench.breakdown=false",
                   "--set", "bench.compile_mode=max-autotune", "--set", "bench.min_time=2.5", "--set", "bench.batch=32",
                   "--set", "bench.threads=4", "--set", "bench.modes=[eager,compile+bf16]",
                   "--set", "bench.reference=eomt", "--set", "bench.runtime=pytorch"])
    a, b = load_config(None, flags.overrides), load_config(None, sets.overrides)
    assert to_dict(a) == to_dict(b) and a.bench.sizes == ["tiny", "S"] and a.bench.fps is False
    assert (a.bench.batch, a.bench.threads, a.bench.min_time, a.bench.modes) == (32, 4, 2.5, ["eager", "compile+bf16"])


def test_flags_and_set_apply_in_command_line_order():
    assert load_config(None, parsed(["bench", "--iters", "3", "--set", "bench.iters=5"]).overrides).bench.iters == 5
    assert load_config(None, parsed(["bench", "--set", "bench.iters=5", "--iters", "3"]).overrides).bench.iters == 3


def test_launch_flags_are_config_keys():
    args = parsed(["launch", "grid.yaml", "--cluster", "debug", "--steps", "train,eval"])
    cfg = load_config(None, args.overrides)
    assert cfg.launch.cluster == "debug" and cfg.launch.steps == ["train", "eval"]
    assert load_config(None, parsed(["launch", "grid.yaml"]).overrides).launch.steps == ["train", "eval", "bench"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "--no-fps", "--precision", "fp8"], "'bench.precision' (from --precision) must be"),
    (["bench", "--no-fps", "--scope", "all"], "'bench.scope' (from --scope) must be"),
    (["launch", "experiments/quickstart_grid.yaml", "--steps", "train,score", "--dry-run"],
     "'launch.steps' (from --steps): unknown step(s) ['score']"),
    (["train", "--set", "model.variant=sfp_m2f", "--set", "model.baseline.deform_head=4"],
     "unknown config key 'model.baseline.deform_head' (from --set)"),
    (["status", "no/such/folder"], "no/such/folder is neither a grid file nor a folder of runs"),
    (["collect", "no/such/folder"], "no/such/folder is not a folder of runs"),
])
def test_user_mistakes_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError or KeyError that is not a UserError is a bug: main() lets it through."""
    import study.config

    def broken(*a, **k):
        raise KeyError("a bug, not the user's mistake")

    monkeypatch.setattr(study.config, "load_config", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["train"])


def test_flag_help_names_the_key_and_states_no_default(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    flags = out[out.index("options:"):]
    assert "(sets bench.img_size)" in flags and "(sets bench.fps=false)" in flags
    # the value comes from the config, not the flag: no help states a default ('default' as torch.compile's
    # mode name is a value, not a stated default)
    stated = re.findall(r"\(default|default[:=)]|the default|by default|defaults? to|\bdefault;", flags.lower())
    assert stated == [], stated
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    # Without a config file the defaults are COCO panoptic at L, not a tiny model (the old help said so).
    assert "tiny EoMT on the built-in synthetic set" in out and "experiments/quickstart.yaml" in out
    cfg = load_config(None)
    assert (cfg.model.size, cfg.model.num_classes, cfg.model.img_size) == ("L", 133, 640)
    assert load_config("experiments/quickstart.yaml").model.size == "tiny"


def test_counting_prints_no_third_party_deprecation_notice():
    """Importing fvcore's counter through the suite prints nothing (torch's jit.script deprecation of fvcore's
    focal losses is filtered in study/__init__.py); another warning still shows."""
    import subprocess
    import sys

    code = ("import warnings, study; from fvcore.nn import FlopCountAnalysis; "
            "warnings.warn('still shown', FutureWarning)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "jit.script" not in err and "still shown" in err
