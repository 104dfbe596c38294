"""Robust-encoder trainers: AdPO (TRL DPOTrainer subclass) and the FARE, TeCoA and Sim-CLIP baselines.

Each trainer module exposes ``main(argv)`` and runs under ``accelerate launch -m trainers.<name> --config ...`` (as modules: no path set-up needed).
"""
