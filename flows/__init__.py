"""The VAE pipeline's Prefect flows and their integration with MLflow and DVC."""

import os

from flows.unresponsive import HEARTBEAT_SECONDS, HEARTBEAT_VARIABLE

# Every flow run of the project sends a heartbeat every 30 s (Prefect's default is 180 s), so
# the server's automation can tell a dead run from a quiet one (flows/unresponsive.py). Set
# before Prefect reads its settings, and inherited by the runs `vae-pipeline serve` starts; a
# value the user set wins.
os.environ.setdefault(HEARTBEAT_VARIABLE, str(HEARTBEAT_SECONDS))
