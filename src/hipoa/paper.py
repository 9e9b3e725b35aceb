"""The method paper's published accuracy (Ebsim et al., Table 2): the bar hipoa's evaluation JSONs
and report are read against. A light module: numbers only."""

from __future__ import annotations

PAPER_TABLE2 = {
    "inferior_femoral_head": [
        {"model": "U-Net 1", "sensitivity": 0.96, "specificity": 0.85, "f1": 0.91, "dice_mean": 0.66, "dice_std": 0.24},
    ],
    "superior_femoral_head": [
        {"model": "U-Net 2", "sensitivity": 0.98, "specificity": 0.92, "f1": 0.94, "dice_mean": 0.71, "dice_std": 0.19},
    ],
    "lateral_acetabulum": [
        {"model": "U-Net 3 (no displacement)", "sensitivity": 0.67, "specificity": 0.84, "f1": 0.71,
         "dice_mean": 0.46, "dice_std": 0.38},
        {"model": "U-Net 4 (displacement 0.05)", "sensitivity": 0.94, "specificity": 0.73, "f1": 0.82,
         "dice_mean": 0.64, "dice_std": 0.24},
    ],
}
"""Ebsim et al., Table 2, per site key (test sets of 409, 793 and 760 left-hip DXAs)."""
