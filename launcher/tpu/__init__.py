"""Cloud TPU control plane: TPU VMs and queued resources through the Cloud TPU API (see `client.py`)."""
