"""The variant record carries its traits (study/models/build.py): row, label, EoMT or not, masked at inference,
its components. A variant registered from outside, through a temporary package's entry point, shows up labelled
in the generic study table and in the component plots, with no file of analysis/ or eval touched."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from study.models import build


def test_traits_of_the_papers_variants():
    v = build.variants()
    assert [n for n in v if v[n].row is not None] == ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder",
                                                       "single_scale", "eomt_masked", "eomt"]
    assert build.eomt_variants() == ("eomt_masked", "eomt")
    assert build.unmasked_at_inference() == ("eomt",)  # Mask2Former and EoMT w/ masking keep it (Table 1)
    assert v["vit_adapter_m2f"].components == ("backbone", "adapter", "pixel_decoder", "decoder")
    assert v["single_scale"].components == ("backbone", "pyramid", "projection", "decoder")


def test_components_are_the_models_own():
    """A record's components are the keys of the built model's ``components()`` (the benchmark's breakdown)."""
    from study.models.config import ModelConfig

    for name in ("eomt", "sfp_no_pixel_decoder"):
        cfg = ModelConfig(variant=name, size="tiny", img_size=64, num_classes=3, num_queries=4,
                          baseline={"hidden_dim": 32, "encoder_ffn": 64, "decoder_ffn": 64, "encoder_heads": 2,
                                    "decoder_heads": 2} if name != "eomt" else {})
        assert tuple(build.build_model(cfg).components()) == build.variants()[name].components


HOOK = '''
def hook(register):
    def build(cfg):
        raise NotImplementedError("not built in this test")
    register("ext_tiny", build, label="External tiny", eomt=False, masked_inference=False,
             components=("stem", "mixer", "head"))
'''


@pytest.fixture
def external_variant(tmp_path, monkeypatch):
    """A package 'extvariant' installed as a dist-info on sys.path, with a study.variants entry point."""
    (tmp_path / "extvariant.py").write_text(HOOK)
    info = tmp_path / "extvariant-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extvariant\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[study.variants]\next = extvariant:hook\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    own = {k: v for k, v in build._REGISTRY.items() if v.eomt}  # registered by study itself, at import
    monkeypatch.setattr(build, "_REGISTRY", own)
    monkeypatch.setattr(build, "_loaded", False)  # the entry points are read again, this package's too
    yield "ext_tiny"
    sys.modules.pop("extvariant", None)


def results(variant: str) -> pd.DataFrame:
    rows = []
    for v, parts in ((variant, {"stem": 1.0, "mixer": 3.0, "head": 0.5}),
                     ("eomt", {"patch_embed": 0.2, "blocks_before_queries": 2.0, "blocks_with_queries": 1.0,
                               "mask_module_and_upscaler": 0.4})):
        for seed in (0, 1):
            rows.append({"run": f"{v}-{seed}", "state": "complete", "model.variant": v, "model.size": "tiny",
                         "model.img_size": 64, "seed": seed, "PQ": 50.0 + seed, "FPS": 90.0 + seed, "GFLOPs": 0.1,
                         "params_M": 0.3, **{f"metrics.bench.breakdown_ms.{k}": t for k, t in parts.items()}})
    return pd.DataFrame(rows)


def test_an_entry_point_variant_reaches_the_study_and_the_component_plot(external_variant):
    import matplotlib.colors as mc
    import matplotlib.pyplot as plt

    from analysis.plots import component_colour, component_plot
    from analysis.study import build_study, study_markdown

    v = build.variants()[external_variant]
    assert (v.label, v.eomt, v.masked_inference, v.components) == ("External tiny", False, False,
                                                                   ("stem", "mixer", "head"))
    assert "vit_adapter_m2f" in build.variants()  # the baselines' own entry point was read again too
    assert external_variant in build.unmasked_at_inference() and external_variant not in build.eomt_variants()
    s = build_study(results(external_variant))
    assert s.axes == ["model.variant"]
    assert dict(zip(s.frame["model.variant"], s.frame["label"])) == {"eomt": "w/o Masking = EoMT",
                                                                      external_variant: "External tiny"}
    assert "| External tiny " in study_markdown(s)
    fig = component_plot(results(external_variant))
    ax = fig.axes[0]
    assert "External tiny tiny/64" in [t.get_text() for t in ax.get_yticklabels()]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"stem", "mixer", "head", "patch embed"} <= set(legend)
    colours = {mc.to_hex(p.get_facecolor()) for p in ax.patches}
    assert component_colour("mixer") in colours and len({component_colour(c) for c in
                                                         ("stem", "mixer", "head", "patch_embed")}) == 4
    plt.close(fig)


def test_token_merging_is_refused_for_a_variant_that_is_not_eomt():
    from study.config import ConfigError
    from study.models.config import ModelConfig

    cfg = ModelConfig(variant="eomt", size="tiny", img_size=64, num_classes=3, num_queries=4)
    cfg.token_merging.enabled = True
    build.check_model_config(cfg)  # EoMT: fine
    cfg.variant = "sfp_no_pixel_decoder"
    with pytest.raises(ConfigError, match="applies to EoMT variants \(eomt_masked, eomt\)"):
        build.check_model_config(cfg)
