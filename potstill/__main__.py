"""`python -m potstill`, so launchers that run a module start the CLI: `torchrun --nproc_per_node N -m potstill
distill ...`, `accelerate launch -m potstill distill ...`."""
from potstill.cli import app

app(prog_name="potstill")
