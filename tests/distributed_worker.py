"""One rank of a test's torchrun job: trains digits through the Python API, then saves this rank's weights."""

import json
import os
import sys
from pathlib import Path

import torch

from imgclf.train import train

out, epochs = Path(sys.argv[1]), int(sys.argv[2])
changes = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # settings that replace the defaults below
result = train(**{**dict(dataset="digits", model="cnn", out=out, quiet=True, optimizer="sgd", lr=0.05,
                         batch_size=64, precision="fp32", augment=[], epochs=epochs), **changes})
torch.save(result.model.state_dict(), out.parent / f"{out.name}-rank{os.environ['RANK']}.pt")
