"""A tree whose training is a stand-in that runs in seconds, to rehearse the
tool itself (its steps, faults and bounds) rather than training:

    python -c "from cloud.rehearsal import standin; standin.write('runs/standin')"
    python -m cloud.tpu submit --rehearse --source runs/standin ... -- --epochs 2

Its training/mnist.py takes --epochs, --sleep S (seconds per epoch),
--checkpoint-dir (process 0 writes EPOCH/done), --resume, --output-dir
(history.csv, metrics.json), --status-file, --hang (ignore SIGTERM and never
end) and --exit CODE@PROCESS (that process exits CODE after its epochs);
the process index is KERAS_DISTRIBUTION_PROCESS_ID.
"""

from __future__ import annotations

from pathlib import Path

MNIST = """\
import argparse, json, os, signal, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.checkpoints import completed_epochs

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--sleep", type=float, default=1.0)
p.add_argument("--checkpoint-dir")
p.add_argument("--resume", action="store_true")
p.add_argument("--output-dir")
p.add_argument("--status-file")
p.add_argument("--hang", action="store_true")
p.add_argument("--exit", default="0@-")
a = p.parse_args()
process = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
if a.hang:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(10**6)
ckpt = Path(a.checkpoint_dir) if a.checkpoint_dir else None
first = max(completed_epochs(ckpt), default=0) + 1 if a.resume and ckpt else 1
print(f"process {process}: epochs {first}..{a.epochs}, args {sys.argv[1:]}", flush=True)
for epoch in range(first, a.epochs + 1):
    time.sleep(a.sleep)
    if process == 0 and ckpt:
        (ckpt / str(epoch)).mkdir(parents=True, exist_ok=True)
        (ckpt / str(epoch) / "done").touch()
    print(f"epoch {epoch}", flush=True)
code, _, on = a.exit.partition("@")
if str(process) == on:
    sys.exit(int(code))
if process == 0:
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{e}\\n" for e in (completed_epochs(ckpt) if ckpt else []))
    (out / "history.csv").write_text("epoch\\n" + rows)
    (out / "metrics.json").write_text(json.dumps({"epochs": a.epochs}))
if a.status_file:
    status = Path(a.status_file.replace("{process}", str(process)))
    status.write_text(json.dumps({"status": "ok", "exit": 0, "message": "done"}) + "\\n")
"""
CHECKPOINTS = """\
from pathlib import Path


def completed_epochs(directory):
    return sorted(int(p.parent.name) for p in Path(directory).glob("*/done"))
"""
ENVIRONMENT = """\
def pin_mismatches(path):
    return []
"""


def write(directory: str | Path, pyproject: str | Path | None = None) -> Path:
    """Write the stand-in tree into `directory` (its pyproject.toml: this
    repository's, for the extras the tool checks); returns the directory."""
    root = Path(directory)
    (root / "training").mkdir(parents=True, exist_ok=True)
    pyproject = Path(
        pyproject or Path(__file__).resolve().parents[2] / "pyproject.toml"
    )
    (root / "pyproject.toml").write_text(pyproject.read_text())
    (root / "constraints.txt").write_text("")
    files = {
        "__init__.py": "",
        "mnist.py": MNIST,
        "checkpoints.py": CHECKPOINTS,
        "environment.py": ENVIRONMENT,
    }
    for name, text in files.items():
        (root / "training" / name).write_text(text)
    return root
