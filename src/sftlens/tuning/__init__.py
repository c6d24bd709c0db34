"""Training: full-parameter SFT (to make a real BASE/SFT pair) and, later, Mid-Block LoRA."""
