"""Tests for `raysearch bench explain`: both arms measured in alternating rounds, a time ratio."""

from __future__ import annotations

import re

from raysearch.cli import main


def test_bench_explain_prints_both_arms_and_their_time_ratio(capsys):
    assert main(["bench", "explain", "--arch", "resnet18", "--image-size", "32", "--steps", "2",
                 "--rounds", "2", "--method", "hirescam"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    m = re.search(r"hirescam ([\d.]+) ms/image, forward \+ backward ([\d.]+) ms/image .*time "
                  r"ratio hirescam / forward-backward ([\d.]+) \(median of 2 paired rounds", out)
    assert m, out
    explain_ms, fb_ms, ratio = map(float, m.groups())
    assert explain_ms > 0 and fb_ms > 0 and ratio > 0
    assert "members" in out or "member count" in out
