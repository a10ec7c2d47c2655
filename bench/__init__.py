"""MedMaaS benchmarks: platform overhead as ratios against bare baselines (`python -m bench`)."""
