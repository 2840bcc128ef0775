"""RLP: reinforcement learning pretraining (Hatamizadeh et al., 2025) on the hybrid model.

rollout.py (contexts, prompts, cached thought sampling),
reward.py (information gain; RPT prefix reward), ema.py (EMA no-think teacher),
objective.py (advantages, clipped surrogate), flops.py (NTP-equivalent tokens), stage.py (wiring).
"""
