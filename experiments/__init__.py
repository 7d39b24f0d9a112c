"""The experiments: benchmarks and the literature reproduction, apart from the orchestration.

They import vae_core, torch, numpy and the standard library only, and log to MLflow only when it
is installed and a tracking URI is given, so they run on a bare GPU machine:

    python3 -m experiments bench --mnist-dir DIR           # the trainer against the seed loop
    python3 -m experiments reproduce --mnist-dir DIR       # rows of Burda et al. 2015, Table 1
    python3 -m experiments eval-bench --mnist-dir DIR      # IWAE evaluation timing
    python3 -m experiments make-tiny-mnist DIR             # a tiny synthetic IDX folder

`vae-pipeline bench|reproduce` are the same commands (reproduce logs to ./mlflow.db by default
there); scripts/gpu_check.sh runs them all within six minutes.
"""
