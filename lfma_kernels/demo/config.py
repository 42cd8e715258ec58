"""The study's settings: model size, budgets, grids, seeds."""
# The model: small enough to train in seconds on 2 CPU cores, shaped like a real ViT.
HIDDEN, LAYERS, HEADS, MLP = 64, 4, 4, 128
# Budgets: real trained scalars per adapted projection (d_in = d_out = 64), 16x from end to end:
# LoRA r * (d_in + d_out) = 128 r (r = 1 .. 16); FourierFT n real coefficients; LFMA 2K (K complex).
BUDGETS = (128, 256, 512, 1024, 2048)
# `make demo`'s default grid fits in 5 minutes on the 2-core CPU machine (42 runs, ~150 s there);
# --full runs every method at every budget (96 runs, ~310 s).
LEAN_METHODS = ("head only", "LoRA", "FourierFT", "LFMA", "full fine-tuning")
LEAN_BUDGETS = (128, 256, 512, 1024)
QUICK_BUDGETS = (128, 512)
ALPHA = {"lfma": 120.0, "fourierft": 150.0}
PRETRAIN_EPOCHS, ADAPT_EPOCHS, QUICK_EPOCHS = 30, 30, 4
BATCH = 32
SEEDS = (0, 1, 2)
HEAD = "classifier"
