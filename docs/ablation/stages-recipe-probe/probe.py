"""One-seed probes of the stages baseline under a lighter recipe (no crops, no label smoothing)."""
import sys
from polynet.ablation import StudyOptions, run_study

epochs = float(sys.argv[1])
name = f"light-{int(epochs)}ep"
out = f"docs/ablation/stages-recipe-probe/{name}"
opts = StudyOptions(
    configs=["ir_3_6_3"], seeds=1,
    train_overrides=dict(epochs=epochs, crop_scale=(1.0, 1.0), label_smoothing=0.0),
    timing_rounds=1, timing_iters=1,
)
run = run_study("stages", out, opts, runs=f"runs/ablation/stages-recipe-probe/{name}")
print(name, [(r["config"], r["seed"], r["top1"], round(r["wall_seconds"])) for r in run.rows])
