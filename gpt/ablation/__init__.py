"""Ablation grids: expansion and identity (grid), running (runner), analysis (analysis)."""
