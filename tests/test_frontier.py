"""tools/frontier.py: the settings it names, the Pareto front it marks, and one small run of its
small-sd part on the tiny model, add-ons included, whose images must match: the add-on packages
on diffusers and minisd's own step skipping, same weights and settings, bf16."""
import json

import pytest

import frontier

PSNR_SAME_METHOD_DB = 35.0  # bf16, tiny model, 64x64: minisd vs the add-on measured ~40 dB, as plain vs diffusers


def test_settings_become_pipeline_keywords():
    assert frontier.call_kwargs("plain", 25) == {}
    assert frontier.call_kwargs("gate", 25) == {"gate_step": 10}
    assert frontier.call_kwargs("gate60", 20) == {"gate_step": 12}
    assert frontier.call_kwargs("gate+cache2-b1", 15) == {"gate_step": 6, "cache_interval": 2, "cache_branch": 1}
    assert frontier.call_kwargs("cache2-b0", 25) == {"cache_interval": 2, "cache_branch": 0}
    assert frontier.call_kwargs("guidance-stop", 25) == {}  # an ablation: not a Pipeline setting


def test_pareto_front_keeps_only_the_undominated():
    def point(name, s, acc):
        return {"setting": name, "s_per_image": s, "accuracy": acc}
    points = [point("a", 1.0, 0.80), point("b", 2.0, 0.90), point("c", 2.5, 0.85),  # c: slower and worse than b
              point("d", 3.0, 0.95), point("e", 3.0, 0.90), point("f", 0.5, 0.60)]  # e: as slow as d, worse
    assert [p["setting"] for p in frontier.pareto_front(points)] == ["a", "b", "d", "f"]
    assert frontier.pareto_front([point("x", 1.0, 0.5), point("y", 1.0, 0.5)]) == [point("x", 1.0, 0.5),
                                                                                    point("y", 1.0, 0.5)]


def test_small_sd_part_runs_and_matches_the_addons(tmp_path, make_tiny):
    out = tmp_path / "frontier.json"
    code = frontier.main(["--part", "small-sd", "--tiny", "--size", "64", "--steps", "5", "--repeats", "1",
                          "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--plot",
                          str(tmp_path / "plot.png")])
    assert code == 0
    rows = json.loads(out.read_text())["small_sd"]["rows"]
    for key in ("diffusers plain", "minisd plain", "minisd gate+cache2-b1", "minisd gate+cache2-b0",
                "deepcache cache2-b1", "tgate gate", "tgate+deepcache gate+cache2-b1"):
        assert "error" not in rows[key], (key, rows[key])
        assert rows[key]["s_per_image"] > 0
    assert rows["diffusers plain"]["vs_diffusers_plain"] == pytest.approx(1.0)
    for ours, theirs in (("minisd gate", "tgate_gate"), ("minisd cache2-b1", "deepcache_cache2-b1"),
                         ("minisd gate+cache2-b1", "tgate+deepcache_gate+cache2-b1")):
        assert rows[ours][f"psnr_vs_{theirs}"] >= PSNR_SAME_METHOD_DB, ours
